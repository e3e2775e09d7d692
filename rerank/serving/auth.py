"""API keys with scopes, and where a server may listen without them (no Ray, no FastAPI).

Clients send `Authorization: Bearer <key>`. Each key has a name (used in logs and
metrics, never the key) and a set of scopes:

    rank    POST /rank
    events  POST /events
    admin   /admin/* (e.g. POST /admin/rollback)

`ApiKeys.authorize(header, scope)` returns the key's name or raises `AuthError`
(401 + `WWW-Authenticate: Bearer` for a missing, malformed or unknown key, 403 for a
key without the scope). With no key configured, auth is off (`enabled` is False) and
every request is let through as "anonymous"; `check_bind` refuses that on a
non-loopback address unless told `insecure`.

Keys are held only as SHA-256 digests and compared with `hmac.compare_digest` against
every configured digest (no early exit), so neither a repr, a pickle sent to a replica,
nor response timing gives a key away. Keys are at least MIN_KEY_LENGTH characters of
the RFC 6750 token alphabet (A-Z a-z 0-9 - . _ ~ + / and trailing =), e.g.
`python -c "import secrets; print(secrets.token_urlsafe(32))"`.

Where keys come from:

* the environment (`ApiKeys.from_env`):
    RERANK_API_KEY    one key with scopes rank + events   (name "RERANK_API_KEY")
    RERANK_ADMIN_KEY  one key with scopes rank + events + admin   (name "RERANK_ADMIN_KEY")
    RERANK_API_KEYS   more keys, comma-separated `key:scope+scope`, e.g.
                      `k1...:rank,k2...:events+admin`   (names "RERANK_API_KEYS[0]", ...)
* config (`ApiKeys.from_mapping`): {name: {"key": KEY, "scopes": [scope, ...], "user_prefix": P,
  "rate_per_s": R, "burst": B}} (the last three optional) where KEY is
    "env:VAR"          the value of environment variable VAR (the config holds no secret)
    "sha256:<64 hex>"  the key's SHA-256 digest (the config holds no secret either)
    anything else      the key itself (avoid in files that are committed or shared)
* both: `ApiKeys.load(config, environ)`.

A key may be bound to a tenant: with `user_prefix`, `check_user(name, user_id)` refuses (403) a
user id outside that prefix, so a tenant's key can neither rank as nor write the history of
another tenant's users. `rate_per_s` (with `burst`, default 2 s of the rate) limits the requests
of one key per replica (`RateLimiter`; 0 = no limit).

Error messages in configuration name keys by their name or environment variable, never by
value; errors answered to clients name neither
(`rerank.infra.redact` masks other secrets in error text).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

Scope = Literal["rank", "events", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
API_KEY_SCOPES: frozenset[Scope] = frozenset({"rank", "events"})
ADMIN_KEY_SCOPES: frozenset[Scope] = frozenset(SCOPES)
MIN_KEY_LENGTH = 16
MAX_KEY_LENGTH = 4096
ENV_API_KEY = "RERANK_API_KEY"
ENV_ADMIN_KEY = "RERANK_ADMIN_KEY"
ENV_API_KEYS = "RERANK_API_KEYS"
ANONYMOUS = "anonymous"  # the name authorize returns while auth is off

_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 b64token
_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


class AuthError(Exception):
    """A request that is not allowed: `status` 401 or 403, `message` for the body, `headers`
    for the response. The message never contains the presented key."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class AuthConfigError(ValueError):
    """Bad key configuration or an unsafe bind; the message names the key, never its value."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key:
        raise AuthConfigError(f"{where}: the API key is empty")
    if len(key) < MIN_KEY_LENGTH:
        raise AuthConfigError(f"{where}: the API key is too short ({len(key)} characters, at least {MIN_KEY_LENGTH})")
    if len(key) > MAX_KEY_LENGTH:
        raise AuthConfigError(f"{where}: the API key is too long (more than {MAX_KEY_LENGTH} characters)")
    if not _TOKEN.fullmatch(key):
        raise AuthConfigError(
            f"{where}: the API key may only use the characters A-Z a-z 0-9 - . _ ~ + / (and trailing =), "
            "so that it can be sent as 'Authorization: Bearer <key>'"
        )
    return key


def _check_scopes(scopes: Any, where: str) -> frozenset[Scope]:
    if isinstance(scopes, str):
        scopes = [scopes]
    try:
        out = frozenset(scopes)
    except TypeError:
        raise AuthConfigError(f"{where}: scopes must be a list of {'|'.join(SCOPES)}") from None
    unknown = sorted(str(s) for s in out - set(SCOPES))
    if unknown:
        raise AuthConfigError(f"{where}: unknown scope(s) {', '.join(unknown)}; expected {'|'.join(SCOPES)}")
    if not out:
        raise AuthConfigError(f"{where}: no scopes; give at least one of {'|'.join(SCOPES)}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class _Entry:
    name: str
    digest: bytes
    scopes: frozenset[Scope]
    user_prefix: str = ""  # "" = any user id
    rate_per_s: float = 0.0  # 0 = no limit
    burst: float = 0.0  # bucket size; 0 = 2 s of rate_per_s

    def __repr__(self) -> str:  # never the digest either
        return f"_Entry(name={self.name!r}, scopes={sorted(self.scopes)})"


def _check_policy(spec: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The optional tenant and rate fields of a configured key."""
    out: dict[str, Any] = {}
    prefix = spec.get("user_prefix", "")
    if not isinstance(prefix, str) or len(prefix) > 256:
        raise AuthConfigError(f"{where}: user_prefix must be a string of at most 256 characters")
    out["user_prefix"] = prefix
    for field in ("rate_per_s", "burst"):
        value = spec.get(field, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e9:
            raise AuthConfigError(f"{where}: {field} must be a number >= 0, got {value!r}")
        out[field] = float(value)
    return out


class ApiKeys:
    """Named API keys with scopes, held as SHA-256 digests (picklable; safe to repr and log)."""

    def __init__(self, entries: Iterable[_Entry] = ()) -> None:
        self._entries: tuple[_Entry, ...] = tuple(entries)
        names: dict[str, _Entry] = {}
        digests: dict[bytes, str] = {}
        for entry in self._entries:
            if entry.name in names:
                raise AuthConfigError(f"API key name {entry.name!r} is configured twice")
            if entry.digest in digests:
                raise AuthConfigError(f"API keys {digests[entry.digest]!r} and {entry.name!r} are the same key")
            names[entry.name] = entry
            digests[entry.digest] = entry.name

    # ------------------------------------------------------------------ construction
    @staticmethod
    def entry(name: str, key: str, scopes: Iterable[str]) -> _Entry:
        """One key; raises AuthConfigError (naming `name`, not the key) when it is unusable."""
        return _Entry(name, _digest(_check_key(key, f"API key {name!r}")), _check_scopes(scopes, f"API key {name!r}"))

    @classmethod
    def from_keys(cls, keys: Mapping[str, tuple[str, Iterable[str]]]) -> ApiKeys:
        """{name: (key, scopes)} with the keys themselves (tests, programmatic use)."""
        return cls(cls.entry(name, key, scopes) for name, (key, scopes) in keys.items())

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Mapping[str, Any]] | None,
                     environ: Mapping[str, str] | None = None) -> ApiKeys:
        """Keys from config: {name: {"key": "env:VAR" | "sha256:<hex>" | KEY, "scopes": [...]}}.

        `env:VAR` is read from `environ` (default os.environ); a missing or empty variable is
        an error naming the variable."""
        environ = os.environ if environ is None else environ
        entries = []
        for name, spec in (mapping or {}).items():
            where = f"API key {name!r}"
            if not isinstance(spec, Mapping):
                raise AuthConfigError(f"{where}: expected {{'key': ..., 'scopes': [...]}}")
            extra = sorted(set(spec) - {"key", "scopes", "user_prefix", "rate_per_s", "burst"})
            if extra:
                raise AuthConfigError(f"{where}: unknown field(s) {', '.join(map(str, extra))}; expected key, scopes "
                                      "(and optionally user_prefix, rate_per_s, burst)")
            policy = _check_policy(spec, where)
            if "scopes" not in spec:
                raise AuthConfigError(f"{where}: no scopes; give at least one of {'|'.join(SCOPES)}")
            scopes = _check_scopes(spec["scopes"], where)
            ref = spec.get("key")
            if not isinstance(ref, str) or not ref:
                raise AuthConfigError(f"{where}: no key; give 'env:VAR', 'sha256:<hex digest>' or the key")
            if ref.startswith("env:"):
                var = ref[len("env:"):]
                value = environ.get(var)
                if not value:
                    raise AuthConfigError(f"{where}: environment variable {var} (from 'env:{var}') is not set")
                digest = _digest(_check_key(value, f"{where} (environment variable {var})"))
            elif ref.startswith("sha256:"):
                hexdigest = ref[len("sha256:"):]
                if not _DIGEST.fullmatch(hexdigest):
                    raise AuthConfigError(f"{where}: 'sha256:' must be followed by 64 hex digits")
                digest = bytes.fromhex(hexdigest)
            else:
                digest = _digest(_check_key(ref, where))
            entries.append(_Entry(str(name), digest, scopes, **policy))
        return cls(entries)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ApiKeys:
        """RERANK_API_KEY (rank+events), RERANK_ADMIN_KEY (rank+events+admin) and
        RERANK_API_KEYS (comma-separated `key:scope+scope`); unset or empty = none."""
        environ = os.environ if environ is None else environ
        entries = []
        for var, scopes in ((ENV_API_KEY, API_KEY_SCOPES), (ENV_ADMIN_KEY, ADMIN_KEY_SCOPES)):
            value = environ.get(var, "").strip()
            if value:
                entries.append(_Entry(var, _digest(_check_key(value, f"environment variable {var}")), scopes))
        for i, part in enumerate(p.strip() for p in environ.get(ENV_API_KEYS, "").split(",")):
            if not part:
                continue
            where = f"environment variable {ENV_API_KEYS}, entry {i}"
            key, sep, scope_text = part.rpartition(":")
            if not sep:
                raise AuthConfigError(f"{where}: expected key:scope+scope (e.g. <key>:rank+events)")
            scopes = _check_scopes([s.strip() for s in scope_text.split("+") if s.strip()], where)
            entries.append(_Entry(f"{ENV_API_KEYS}[{i}]", _digest(_check_key(key.strip(), where)), scopes))
        return cls(entries)

    @classmethod
    def load(cls, config: Mapping[str, Mapping[str, Any]] | None = None,
             environ: Mapping[str, str] | None = None) -> ApiKeys:
        """Config keys (`from_mapping`) and environment keys (`from_env`) together."""
        return cls.from_mapping(config, environ) | cls.from_env(environ)

    def __or__(self, other: ApiKeys) -> ApiKeys:
        """Both sets of keys (a name or key configured in both is an AuthConfigError)."""
        return ApiKeys(self._entries + other._entries)

    # ------------------------------------------------------------------ queries
    @property
    def enabled(self) -> bool:
        """True when at least one key is configured (no keys = auth off)."""
        return bool(self._entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    def _named(self, name: str) -> _Entry:
        for entry in self._entries:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def scopes_of(self, name: str) -> frozenset[Scope]:
        return self._named(name).scopes

    def rate_of(self, name: str) -> tuple[float, float]:
        """(rate_per_s, burst) of a key; (0, 0) = no limit (also for ANONYMOUS)."""
        if name == ANONYMOUS:
            return 0.0, 0.0
        entry = self._named(name)
        return entry.rate_per_s, entry.burst or 2.0 * entry.rate_per_s

    def tenant_of(self, name: str) -> str:
        """The tenant (user_prefix) of a key; "" for keys without one (they share one namespace)."""
        return "" if name == ANONYMOUS else self._named(name).user_prefix

    def check_user(self, name: str, user_id: str) -> None:
        """AuthError 403 when the key `name` is bound to a tenant prefix that `user_id` lacks."""
        if name == ANONYMOUS:
            return
        prefix = self._named(name).user_prefix
        if prefix and not user_id.startswith(prefix):
            raise AuthError(403, "user_id is outside this API key's tenant (its user_prefix)")

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        admin = sum("admin" in e.scopes for e in self._entries)
        return f"ApiKeys({len(self._entries)} keys, {admin} with admin)"

    __str__ = __repr__

    def _match(self, key: str) -> _Entry | None:
        """The entry whose digest equals the key's; every digest is compared (constant time)."""
        presented = _digest(key)
        found = None
        for entry in self._entries:
            if hmac.compare_digest(presented, entry.digest):
                found = entry
        return found

    def authorize(self, authorization: str | None, scope: Scope) -> str:
        """The name of the key in an `Authorization` header value if it has `scope`.

        Raises AuthError: 401 (with WWW-Authenticate) when the header is missing, is not
        `Bearer <key>`, or the key is unknown; 403 when the key lacks the scope (the message
        names neither the key nor its name: the caller may not be its owner). With auth
        off (no keys), returns ANONYMOUS for any header.
        """
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; expected {'|'.join(SCOPES)}")
        if not self._entries:
            return ANONYMOUS
        if authorization is None or not authorization.strip():
            raise AuthError(401, "missing API key; send 'Authorization: Bearer <key>'",
                            {"WWW-Authenticate": "Bearer"})
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_KEY_LENGTH or not _TOKEN.fullmatch(token):
            raise AuthError(401, "malformed Authorization header; expected 'Authorization: Bearer <key>'",
                            {"WWW-Authenticate": 'Bearer error="invalid_request"'})
        entry = self._match(token)
        if entry is None:
            raise AuthError(401, "invalid API key", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if scope not in entry.scopes:
            raise AuthError(403, f"this API key lacks the {scope!r} scope",
                            {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'})
        return entry.name


# ---------------------------------------------------------------------- binding
def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (also [::1] and ::ffff:127.x); False for
    anything else, including 0.0.0.0, :: and other host names (they may resolve anywhere)."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in ("localhost", "localhost."):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def check_bind(host: str, keys: ApiKeys | None, insecure: bool = False) -> None:
    """Refuse (AuthConfigError) to serve on a non-loopback `host` without API keys unless
    `insecure`. Loopback addresses, or any address with keys configured, are fine."""
    if insecure or is_loopback(host) or (keys is not None and keys.enabled):
        return
    raise AuthConfigError(
        f"refusing to listen on {host!r} without API keys: anyone who can reach it could rank, write events "
        f"and roll the model back. Set {ENV_API_KEY} and {ENV_ADMIN_KEY} (or keys in the config), bind to "
        "127.0.0.1, or pass --insecure to serve without authentication"
    )


# ---------------------------------------------------------------------- rate limits
class RateLimiter:
    """Token buckets per key name: `retry_after(name, rate, burst)` takes one token and returns
    0.0, or the seconds until one is free (the request is refused: 429 with Retry-After).
    Per process: with N replicas a key gets up to N times its rate. Thread-safe; bounded to
    `max_keys` buckets (configured keys are few; anonymous requests are not limited here)."""

    def __init__(self, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)
        self._lock = threading.Lock()
        self._max_keys = max_keys
        self._clock = clock

    def retry_after(self, name: str, rate_per_s: float, burst: float) -> float:
        if rate_per_s <= 0:
            return 0.0
        burst = max(burst, 1.0)
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(name, (burst, now))
            tokens = min(burst, tokens + (now - at) * rate_per_s)
            if tokens >= 1.0:
                if name not in self._buckets and len(self._buckets) >= self._max_keys:
                    self._buckets.pop(next(iter(self._buckets)))
                self._buckets[name] = (tokens - 1.0, now)
                return 0.0
            self._buckets[name] = (tokens, now)
            return (1.0 - tokens) / rate_per_s
