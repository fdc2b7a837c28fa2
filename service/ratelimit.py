"""Per-caller request limits: a sliding one-minute window per API key (or OIDC subject),
and one per client address for failed credentials (a key guessed by brute force).

With Celery on Redis the window lives in Redis, so every gateway replica counts against
one limit (a site behind a load balancer with three gateways otherwise allows three times
the configured rate). Without a broker, or while Redis does not answer, each process
counts on its own: a Redis outage never refuses requests that the limit would allow.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict, deque
from typing import Protocol

log = logging.getLogger(__name__)

WINDOW_S = 60.0


class RateLimited(Exception):
    """More than the allowed requests in the last minute; retry after ``retry_after`` s."""

    def __init__(self, per_minute: int, retry_after: int, what: str = "requests"):
        super().__init__(f"more than {per_minute} {what} per minute")
        self.per_minute, self.retry_after = per_minute, retry_after


class RateLimiter(Protocol):
    per_minute: int

    def check(self, key_id: str) -> None:
        """Count one request of ``key_id``; raise :class:`RateLimited` past the limit."""

    def peek(self, key_id: str) -> int | None:
        """Seconds until ``key_id`` may be counted again if it is at the limit, else None
        (counts nothing: a guard in front of work that :meth:`check` then counts)."""


class LocalRateLimiter:
    """The window in this process's memory."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.hits: dict[str, deque] = defaultdict(deque)
        self.lock = threading.Lock()

    def check(self, key_id: str) -> None:
        wait = self._count(key_id, add=True)
        if wait is not None:
            raise RateLimited(self.per_minute, wait)

    def peek(self, key_id: str) -> int | None:
        return self._count(key_id, add=False)

    def _count(self, key_id: str, add: bool) -> int | None:
        """Seconds to wait if ``key_id`` is at the limit; else None (and, with ``add``,
        this hit counted)."""
        t = time.monotonic()
        with self.lock:
            q = self.hits[key_id]
            while q and t - q[0] > WINDOW_S:
                q.popleft()
            if len(q) >= self.per_minute:
                return int(WINDOW_S - (t - q[0])) + 1
            if add:
                q.append(t)
            return None


# One round trip, atomic: drop hits older than the window, count, add this one if allowed
# (ARGV[3], the hit's unique member; empty: only look, as ``peek`` does). Times come from the
# Redis server's clock, so gateways on different hosts agree.
_SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local window, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tostring(window - (now - tonumber(oldest[2])))
end
if ARGV[3] == '' then
  return false
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(window) + 1)
return false
"""


class RedisRateLimiter:
    """The window in Redis (a sorted set of request times per key), shared by every gateway
    on that Redis; falls back to ``LocalRateLimiter`` while Redis does not answer."""

    def __init__(self, url: str, per_minute: int, prefix: str = "scorerecon:rate:"):
        import redis

        self.per_minute, self.prefix = per_minute, prefix
        self.errors = (redis.RedisError, OSError)
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.script = client.register_script(_SLIDING_WINDOW)
        self.fallback = LocalRateLimiter(per_minute)
        self._warned = False
        self._retry_at = 0.0  # after a failure, Redis is tried again only after RETRY_S

    RETRY_S = 5.0

    def check(self, key_id: str) -> None:
        if time.monotonic() < self._retry_at:
            self.fallback.check(key_id)
            return
        try:
            wait = self.script(
                keys=[self.prefix + key_id], args=[WINDOW_S, self.per_minute, uuid.uuid4().hex]
            )
        except self.errors as exc:
            # A Redis that times out would otherwise cost every request its timeout.
            self._retry_at = time.monotonic() + self.RETRY_S
            if not self._warned:
                log.warning("rate limit: Redis unreachable (%s); counting per process", exc)
                self._warned = True
            self.fallback.check(key_id)
            return
        if self._warned:
            log.info("rate limit: Redis answers again; counting site-wide")
            self._warned = False
        if wait is not None:
            raise RateLimited(self.per_minute, int(float(wait)) + 1)

    def peek(self, key_id: str) -> int | None:
        if time.monotonic() < self._retry_at:
            return self.fallback.peek(key_id)
        try:
            wait = self.script(keys=[self.prefix + key_id], args=[WINDOW_S, self.per_minute, ""])
        except self.errors:
            self._retry_at = time.monotonic() + self.RETRY_S
            return self.fallback.peek(key_id)
        return None if wait is None else int(float(wait)) + 1


def make_rate_limiter(
    executor: str, broker_url: str, per_minute: int, prefix: str = "scorerecon:rate:"
) -> RateLimiter:
    """Site-wide in Redis when jobs go through Celery on Redis, else per process."""
    if executor == "celery" and broker_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisRateLimiter(broker_url, per_minute, prefix)
    return LocalRateLimiter(per_minute)
