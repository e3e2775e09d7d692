"""A single-holder lease in Redis: at most one online trainer works a stream at a time.

The holder SETs `key` to its random token with NX and a TTL, and renews it (compare-and-set)
more often than the TTL; a holder that stops renewing (killed, paused, cut off) loses the lease
after `ttl_s`, and a standby takes it. A redeploy that briefly runs an old and a new trainer
replica side by side therefore never has two publishers to one registry.
"""

from __future__ import annotations

import uuid

import redis

# renew or release only while the key still holds our token (another holder may own it now)
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class RedisLease:
    def __init__(self, client: redis.Redis, key: str, ttl_s: float = 10.0, token: str | None = None) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
        self.client = client
        self.key = key
        self.ttl_ms = int(ttl_s * 1000)
        self.token = token or uuid.uuid4().hex
        self.held = False
        self.term = 0  # +1 each time acquire() takes the lease afresh (not a renewal of an unbroken hold)

    def acquire(self) -> bool:
        """Take the lease if free, renew it if ours; False while another holder has it.
        Raises redis errors (the caller backs off): an unreachable Redis is not a lost lease yet.
        A change of `term` means the hold was broken in between (it lapsed, maybe another holder
        worked meanwhile): state kept from the previous term may be stale."""
        if self.held and self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms):
            return True
        self.held = bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))
        if not self.held:  # a crash-restarted holder reusing its token finds its own key
            self.held = bool(self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms))
        if self.held:
            self.term += 1
        return self.held

    def release(self) -> None:
        """Give the lease up now (a clean stop), so a successor need not wait for the TTL."""
        try:
            self.client.eval(_RELEASE, 1, self.key, self.token)
        finally:
            self.held = False

    def holder(self) -> str | None:
        """The token of the current holder, None when free."""
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value
