"""Per-key request rate limits (issue 10, item 6): a token bucket per API key, in each
API replica's memory. A key may send `request_burst` requests at once, then
`requests_per_second` on average; past that a request gets 429 RESOURCE_EXHAUSTED with
`Retry-After` (whole seconds until the next request would pass).

Counted after the key is authenticated: the key ID is public, so counting before would
let anyone spend another tenant's budget with wrong secrets. With N API replicas a key
gets up to N times the rate (Serve spreads requests); the buckets start full after a
replica restart.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from raybatch.config import ServiceConfig
from raybatch.exceptions import RateLimited


@dataclass
class TokenBucket:
    rate: float  # tokens added per second
    burst: int  # the most tokens it holds
    tokens: float = -1.0  # starts full
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = float(self.burst)

    def take(self, now: float) -> float:
        """Take one token: 0 if there was one, else the seconds until there is."""
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimiter:
    def __init__(self, config: ServiceConfig, clock: Callable[[], float] = time.monotonic):
        self._config = config
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}  # key ID → bucket; as many as valid keys
        self._lock = threading.Lock()  # sync routes run in Starlette's thread pool

    def check(self, key_id: str, account: str) -> None:
        """Count one request of this key; RateLimited if it is over its rate."""
        quota = self._config.quota(account)
        with self._lock:
            now = self._clock()
            bucket: Optional[TokenBucket] = self._buckets.get(key_id)
            if bucket is None:
                bucket = self._buckets[key_id] = TokenBucket(quota.requests_per_second, quota.request_burst, updated=now)
            wait = bucket.take(now)
        if wait:
            raise RateLimited(
                f"API key {key_id} sent more than {quota.requests_per_second:g} requests per second "
                f"(bursts of {quota.request_burst}); retry after {math.ceil(wait)}s",
                retry_after=max(1, math.ceil(wait)),
            )
