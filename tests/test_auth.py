"""API keys with scopes (rerank.serving.auth): 401/403, key sources, no key in any text, bind checks, URL redaction."""

from __future__ import annotations

import hashlib
import pickle
import re

import pytest

import rerank.serving.auth as auth
from rerank.serving.auth import (
    ANONYMOUS,
    ApiKeys,
    AuthConfigError,
    AuthError,
    check_bind,
    is_loopback,
)
from rerank.infra.redact import redact, safe_url

RANK_KEY = "rank-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
EVENTS_KEY = "events-key-0123456789abcdef"


@pytest.fixture
def keys() -> ApiKeys:
    return ApiKeys.from_keys({
        "shop": (RANK_KEY, ["rank"]),
        "ops": (ADMIN_KEY, ["rank", "events", "admin"]),
        "tracker": (EVENTS_KEY, ["events"]),
    })


def _error(keys: ApiKeys, header: str | None, scope: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        keys.authorize(header, scope)
    return info.value


def test_authorize_returns_the_key_name_for_a_key_with_the_scope(keys):
    assert keys.enabled and len(keys) == 3
    assert keys.authorize(f"Bearer {RANK_KEY}", "rank") == "shop"
    assert keys.authorize(f"bearer   {ADMIN_KEY} ", "admin") == "ops"  # scheme is case-insensitive
    assert keys.authorize(f"Bearer {EVENTS_KEY}", "events") == "tracker"


@pytest.mark.parametrize(
    "header",
    [None, "", "   ", RANK_KEY, f"Basic {RANK_KEY}", "Bearer", "Bearer ", f"Bearer {RANK_KEY} extra",
     "Bearer k\u00e9y"],
)
def test_missing_or_malformed_header_is_401_with_www_authenticate(keys, header):
    err = _error(keys, header, "rank")
    assert err.status == 401
    assert err.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Bearer <key>" in err.message


def test_unknown_key_is_401_and_no_text_contains_it(keys):
    wrong = "not-a-configured-key-0123456789"
    err = _error(keys, f"Bearer {wrong}", "rank")
    assert err.status == 401 and err.message == "invalid API key"
    assert err.headers == {"WWW-Authenticate": 'Bearer error="invalid_token"'}
    for text in (str(err), repr(err), err.message, str(err.headers)):
        assert wrong not in text
    # a configured key with one character changed is unknown too
    assert _error(keys, f"Bearer {RANK_KEY[:-1]}X", "rank").status == 401


@pytest.mark.parametrize(("key", "scope", "name"), [(RANK_KEY, "events", "shop"), (RANK_KEY, "admin", "shop"),
                                                     (EVENTS_KEY, "rank", "tracker")])
def test_key_without_the_scope_is_403_naming_neither_the_key_nor_its_name(keys, key, scope, name):
    err = _error(keys, f"Bearer {key}", scope)
    assert err.status == 403
    assert scope in err.message and key not in err.message and name not in err.message
    assert 'error="insufficient_scope"' in err.headers["WWW-Authenticate"]


def test_unknown_scope_is_a_programming_error(keys):
    with pytest.raises(ValueError, match="unknown scope 'write'"):
        keys.authorize(f"Bearer {RANK_KEY}", "write")  # type: ignore[arg-type]


def test_no_keys_means_auth_off():
    keys = ApiKeys()
    assert not keys.enabled and len(keys) == 0
    assert keys.authorize(None, "admin") == ANONYMOUS
    assert ApiKeys.from_env({}).enabled is False
    assert ApiKeys.from_env({"RERANK_API_KEY": "", "RERANK_API_KEYS": " , "}).enabled is False


def test_keys_are_compared_in_constant_time_against_every_key(keys, monkeypatch):
    calls = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert keys.authorize(f"Bearer {RANK_KEY}", "rank") == "shop"  # the first key matches ...
    assert len(calls) == 3  # ... and the other two are still compared (no early exit)
    presented = hashlib.sha256(RANK_KEY.encode()).digest()
    assert all(a == presented for a, _ in calls)  # digests, not the raw key, are compared
    calls.clear()
    _error(keys, "Bearer some-unknown-key-0123456789", "rank")
    assert len(calls) == 3


def test_only_digests_are_held_and_repr_shows_counts(keys):
    text = repr(keys) + str(keys) + repr(keys._entries) + str(vars(keys))
    assert text.startswith("ApiKeys(3 keys, 1 with admin)")
    for key in (RANK_KEY, ADMIN_KEY, EVENTS_KEY):
        assert key not in text
        assert key.encode() not in pickle.dumps(keys)  # what a Ray replica receives
        assert hashlib.sha256(key.encode()).hexdigest() not in text
    clone = pickle.loads(pickle.dumps(keys))
    assert clone.authorize(f"Bearer {ADMIN_KEY}", "admin") == "ops"


def test_from_env_scopes():
    env = {
        "RERANK_API_KEY": RANK_KEY,
        "RERANK_ADMIN_KEY": ADMIN_KEY,
        "RERANK_API_KEYS": f"{EVENTS_KEY}:events, other-key-0123456789abcdef:rank+admin",
    }
    keys = ApiKeys.from_env(env)
    assert keys.names == ["RERANK_API_KEY", "RERANK_ADMIN_KEY", "RERANK_API_KEYS[0]", "RERANK_API_KEYS[1]"]
    assert keys.scopes_of("RERANK_API_KEY") == {"rank", "events"}
    assert keys.scopes_of("RERANK_ADMIN_KEY") == {"rank", "events", "admin"}
    assert keys.scopes_of("RERANK_API_KEYS[0]") == {"events"}
    assert keys.scopes_of("RERANK_API_KEYS[1]") == {"rank", "admin"}
    assert keys.authorize(f"Bearer {RANK_KEY}", "events") == "RERANK_API_KEY"
    assert _error(keys, f"Bearer {RANK_KEY}", "admin").status == 403
    assert keys.authorize(f"Bearer {ADMIN_KEY}", "admin") == "RERANK_ADMIN_KEY"
    assert keys.authorize("Bearer other-key-0123456789abcdef", "admin") == "RERANK_API_KEYS[1]"


def test_from_mapping_with_env_and_digest_references():
    env = {"SHOP_KEY": RANK_KEY}
    config = {
        "shop": {"key": "env:SHOP_KEY", "scopes": ["rank", "events"]},
        "ops": {"key": "sha256:" + hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "scopes": ["admin"]},
        "tracker": {"key": EVENTS_KEY, "scopes": "events"},
    }
    keys = ApiKeys.from_mapping(config, environ=env)
    assert keys.authorize(f"Bearer {RANK_KEY}", "events") == "shop"
    assert keys.authorize(f"Bearer {ADMIN_KEY}", "admin") == "ops"
    assert _error(keys, f"Bearer {ADMIN_KEY}", "rank").status == 403
    assert keys.authorize(f"Bearer {EVENTS_KEY}", "events") == "tracker"
    both = ApiKeys.load({"shop": config["shop"]}, environ={**env, "RERANK_ADMIN_KEY": ADMIN_KEY})
    assert both.names == ["shop", "RERANK_ADMIN_KEY"]


@pytest.mark.parametrize(
    ("build", "message", "secret"),
    [
        (lambda: ApiKeys.from_env({"RERANK_API_KEY": "short-secret"}), "RERANK_API_KEY: the API key is too short",
         "short-secret"),
        (lambda: ApiKeys.from_env({"RERANK_ADMIN_KEY": "has spaces in the key!!"}), "RERANK_ADMIN_KEY: the API key may",
         "has spaces"),
        (lambda: ApiKeys.from_env({"RERANK_API_KEYS": "no-scope-given-0123456789"}), "key:scope+scope",
         "no-scope-given"),
        (lambda: ApiKeys.from_env({"RERANK_API_KEYS": "long-enough-key-0123456789:write"}), "unknown scope(s) write",
         "long-enough-key"),
        (lambda: ApiKeys.from_env({"RERANK_API_KEY": RANK_KEY, "RERANK_ADMIN_KEY": RANK_KEY}), "are the same key",
         RANK_KEY),
        (lambda: ApiKeys.from_mapping({"a": {"key": "", "scopes": ["rank"]}}), "'a': no key", None),
        (lambda: ApiKeys.from_mapping({"a": {"key": "tiny-key", "scopes": ["rank"]}}), "'a': the API key is too short",
         "tiny-key"),
        (lambda: ApiKeys.from_mapping({"a": {"key": RANK_KEY, "scopes": []}}), "'a': no scopes", RANK_KEY),
        (lambda: ApiKeys.from_mapping({"a": {"key": RANK_KEY}}), "'a': no scopes", RANK_KEY),
        (lambda: ApiKeys.from_mapping({"a": {"key": RANK_KEY, "scopes": ["rank"], "secret": 1}}),
         "unknown field(s) secret", RANK_KEY),
        (lambda: ApiKeys.from_mapping({"a": {"key": "env:NOPE", "scopes": ["rank"]}}, environ={}),
         "environment variable NOPE (from 'env:NOPE') is not set", None),
        (lambda: ApiKeys.from_mapping({"a": {"key": "env:SHORT", "scopes": ["rank"]}}, environ={"SHORT": "pw-1234"}),
         "(environment variable SHORT): the API key is too short", "pw-1234"),
        (lambda: ApiKeys.from_mapping({"a": {"key": "sha256:abc", "scopes": ["rank"]}}), "64 hex digits", None),
    ],
)
def test_bad_key_configuration_is_refused_without_echoing_the_key(build, message, secret):
    with pytest.raises(AuthConfigError) as info:
        build()
    assert message in str(info.value)
    if secret is not None:
        assert secret not in str(info.value)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("LOCALHOST", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
     ("example.com", False), ("", False), ("128.0.0.1", False)],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_check_bind_refuses_public_addresses_without_keys(keys):
    check_bind("127.0.0.1", None)
    check_bind("localhost", ApiKeys())
    check_bind("0.0.0.0", keys)
    check_bind("0.0.0.0", ApiKeys(), insecure=True)
    for host, no_keys in (("0.0.0.0", None), ("10.1.2.3", ApiKeys()), ("::", ApiKeys.from_env({}))):
        with pytest.raises(AuthConfigError) as info:
            check_bind(host, no_keys)
        assert host in str(info.value) and "--insecure" in str(info.value) and "RERANK_API_KEY" in str(info.value)


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://default:s3cr3t@10.0.0.1:6380/2", "redis://default:***@10.0.0.1:6380/2"),
        ("rediss://:p@ss@[::1]:6379/0", "rediss://:***@[::1]:6379/0"),
        ("redis://localhost:6379/0?password=hunter2&db=1", "redis://localhost:6379/0?password=***&db=1"),
        ("unix://:pw@/tmp/redis.sock?db=0", "unix://:***@/tmp/redis.sock?db=0"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://user@host:6379", "redis://user@host:6379"),
    ],
)
def test_safe_url_masks_the_password(url, safe):
    assert safe_url(url) == safe


def test_redact_masks_urls_and_given_secrets():
    text = f"Error connecting to redis://:hunter2@db:6379/0 with key {RANK_KEY} (x={RANK_KEY[:4]})"
    out = redact(text, [RANK_KEY, None, ""])
    assert "hunter2" not in out and RANK_KEY not in out
    assert out == f"Error connecting to redis://:***@db:6379/0 with key *** (x={RANK_KEY[:4]})"
    assert redact("nothing secret here") == "nothing secret here"


def test_a_public_listener_without_the_front_proxy_is_warned_about():
    from deployments.local import exposure_warning

    assert exposure_warning("127.0.0.1", front_proxy=False) is None
    assert exposure_warning("0.0.0.0", front_proxy=True) is None
    warning = exposure_warning("0.0.0.0", front_proxy=False)
    assert "0.0.0.0" in warning and "--front-proxy" in warning and "/-/healthz" in warning


def test_a_key_bound_to_a_tenant_refuses_other_users():
    keys = ApiKeys.from_mapping({"shop-a": {"key": RANK_KEY, "scopes": ["rank", "events"], "user_prefix": "a:"},
                                 "any": {"key": ADMIN_KEY, "scopes": ["rank"]}})
    assert keys.authorize(f"Bearer {RANK_KEY}", "rank") == "shop-a"
    keys.check_user("shop-a", "a:u1")
    with pytest.raises(AuthError) as caught:
        keys.check_user("shop-a", "b:u1")
    assert caught.value.status == 403 and "tenant" in caught.value.message and "shop-a" not in caught.value.message
    keys.check_user("any", "b:u1")  # no prefix: any user
    keys.check_user(ANONYMOUS, "b:u1")
    assert keys.tenant_of("shop-a") == "a:" and keys.tenant_of("any") == keys.tenant_of(ANONYMOUS) == ""


@pytest.mark.parametrize("spec, message", [
    ({"user_prefix": 5}, "user_prefix must be a string"),
    ({"rate_per_s": -1}, "rate_per_s must be a number >= 0"),
    ({"burst": "lots"}, "burst must be a number >= 0"),
    ({"rate": 3}, "unknown field(s) rate"),
])
def test_bad_tenant_or_rate_fields_are_config_errors(spec, message):
    with pytest.raises(AuthConfigError, match=re.escape(message)):
        ApiKeys.from_mapping({"k": {"key": RANK_KEY, "scopes": ["rank"], **spec}})


def test_rate_limiter_allows_the_burst_then_the_rate():
    from rerank.serving.auth import RateLimiter

    now = [100.0]
    limiter = RateLimiter(clock=lambda: now[0])
    keys = ApiKeys.from_mapping({"k": {"key": RANK_KEY, "scopes": ["rank"], "rate_per_s": 2.0, "burst": 3}})
    rate, burst = keys.rate_of("k")
    assert (rate, burst) == (2.0, 3.0) and keys.rate_of(ANONYMOUS) == (0.0, 0.0)
    assert [limiter.retry_after("k", rate, burst) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.retry_after("k", rate, burst)
    assert wait == pytest.approx(0.5)  # one token comes back every 1/rate seconds
    now[0] += 0.5
    assert limiter.retry_after("k", rate, burst) == 0.0
    assert limiter.retry_after("other", 0.0, 0.0) == 0.0  # no limit configured
    default = ApiKeys.from_mapping({"k": {"key": RANK_KEY, "scopes": ["rank"], "rate_per_s": 5}})
    assert default.rate_of("k") == (5.0, 10.0)
