"""The feature store's errors, and which Redis failures count as "unavailable" (retryable).

Socket timeouts are small (0.2 s by default) and a dead pooled connection is retried once. An
unreachable or timed-out server, or a transient error reply (OOM, READONLY, LOADING, BUSY, ...),
raises FeatureStoreUnavailable: serving degrades, the event API answers with a retryable status.
"""

from __future__ import annotations

import re

import redis


class FeatureStoreUnavailable(RuntimeError):
    """Redis is unreachable or timed out; callers degrade (ranking) or refuse with a retryable status."""


class FeatureStoreError(RuntimeError):
    """The store holds data that contradicts what is being loaded (e.g. an id mapped to another idx)."""


class EventValidationError(ValueError):
    """An event with a missing or malformed field; the message names the event and field."""


UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)
# error replies of a server that is up but cannot take this now (out of memory, a read-only
# replica after failover, loading its data, a long script): retryable, like an outage
# (inside a script the reply reads "Error running script ...: @user_script: 28: -OOM ...")
_TRANSIENT_REPLY = re.compile(r"(?:^|: -)(OOM|READONLY|LOADING|BUSY|MASTERDOWN|TRYAGAIN|CLUSTERDOWN)\b")


def is_transient(err: Exception) -> bool:
    """Whether an error reply is one of a server that is up but cannot take this now."""
    # redis-py turns a command's own -OOM / -READONLY reply into these classes, minus the code
    if isinstance(err, (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)):
        return True
    return isinstance(err, redis.ResponseError) and _TRANSIENT_REPLY.search(str(err)) is not None


def unavailable(url: str, err: Exception, what: str) -> FeatureStoreUnavailable:
    """The FeatureStoreUnavailable for `err` during `what`, credentials redacted."""
    from rerank.infra.redact import redact, safe_url

    return FeatureStoreUnavailable(f"feature store at {safe_url(url)} unavailable during {what}: {redact(str(err))}")
