"""POST with retries, for the clients that write to the service (replay, simulate).

A `RetryPolicy` says which failures are retried and after how long: an exception of
`exceptions` (a connection error, a timeout) after `backoff_s * growth ** attempt`; a response
whose status is in `statuses` (503: the service is shedding load or Redis is down) after its
Retry-After, capped at `retry_after_max_s`, or after `retry_after_default_s` when it has no
usable Retry-After (None: not retried). Any other status is final. Retrying is safe for
/events because event ids make a resent event a duplicate, not a second count.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class RetryPolicy:
    retries: int  # retries after the first attempt
    exceptions: tuple[type[BaseException], ...] = (httpx.TransportError,)
    backoff_s: float = 0.5  # after an exception: backoff_s * growth ** attempt (attempt 0-based)
    growth: float = 2.0
    statuses: frozenset[int] = frozenset({503})
    retry_after_default_s: float | None = None  # a retried status without a usable Retry-After
    retry_after_max_s: float | None = None

    def delay(self, failure: httpx.Response | BaseException, attempt: int) -> float | None:
        """Seconds to wait before retrying failed attempt `attempt` (0-based); None: do not retry."""
        if attempt >= self.retries:
            return None
        if isinstance(failure, BaseException):
            return self.backoff_s * self.growth**attempt
        if failure.status_code not in self.statuses:
            return None
        try:
            wait = max(float(failure.headers["retry-after"]), 0.0)
        except (KeyError, ValueError):
            return self.retry_after_default_s
        return wait if self.retry_after_max_s is None else min(wait, self.retry_after_max_s)


@dataclass
class PostResult:
    response: httpx.Response | None  # the 200 response; None when the last attempt failed
    error: str  # the last failure: its status code ("503") or exception class name; "" after a 200
    message: str  # the same in words: "HTTP 503: <body>" or "ConnectError: <text>"
    retries: int
    ms: float  # how long the last attempt took


async def post_with_retries(client: httpx.AsyncClient, url: str, body: dict, policy: RetryPolicy) -> PostResult:
    """POST `body` as JSON to `url` until a 200 or a failure `policy` does not retry."""
    attempt = 0
    while True:
        sent = time.perf_counter()
        try:
            response = await client.post(url, json=body)
        except policy.exceptions as err:
            failure: httpx.Response | BaseException = err
            error, message = type(err).__name__, f"{type(err).__name__}: {err}"
        else:
            if response.status_code == 200:
                return PostResult(response, "", "", attempt, (time.perf_counter() - sent) * 1000.0)
            failure = response
            error, message = str(response.status_code), f"HTTP {response.status_code}: {response.text[:200]}"
        delay = policy.delay(failure, attempt)
        if delay is None:
            return PostResult(None, error, message, attempt, (time.perf_counter() - sent) * 1000.0)
        attempt += 1
        await asyncio.sleep(delay)
