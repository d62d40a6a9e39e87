"""In-process sliding-window rate limits (login, predict): no Redis, one node.

`hit(*keys)` counts one request against every key (e.g. the client address
and the user name) and returns None, or the whole seconds to wait when any
key is already at its limit (then nothing is counted). The caller answers 429
with that as Retry-After.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Callable, Hashable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from node.config import RateLimit

# Beyond this many tracked keys, keys with no recent request are dropped.
MAX_KEYS = 50_000


class RateLimiter:
    def __init__(self, requests: int, per_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.requests, self.window, self.clock = requests, per_seconds, clock
        self._hits: dict[Hashable, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, *keys: Hashable) -> int | None:
        t = self.clock()
        with self._lock:
            wait = 0.0
            for key in keys:
                hits = self._hits.get(key)
                if hits is None:
                    continue
                while hits and hits[0] <= t - self.window:
                    hits.popleft()
                if len(hits) >= self.requests:
                    wait = max(wait, hits[0] + self.window - t)
            if wait > 0:
                return max(1, math.ceil(wait))
            if len(self._hits) > MAX_KEYS:
                self._sweep(t)
            for key in keys:
                self._hits.setdefault(key, deque()).append(t)
            return None

    def _sweep(self, t: float) -> None:
        for key in [k for k, hits in self._hits.items() if not hits or hits[-1] <= t - self.window]:
            del self._hits[key]


def limiter(app: FastAPI, name: str, rate: RateLimit) -> RateLimiter:
    """The app's limiter called `name` (one per app, made on first use)."""
    limiters = _limiters(app)
    with _setup:
        existing = limiters.get(name)
        if existing is None or (existing.requests, existing.window) != (rate.requests, rate.per_seconds):
            existing = limiters[name] = RateLimiter(rate.requests, rate.per_seconds)
        return existing


_setup = threading.Lock()


def _limiters(app: FastAPI) -> dict[str, RateLimiter]:
    with _setup:
        if not hasattr(app.state, "rate_limiters"):
            app.state.rate_limiters = {}
        return app.state.rate_limiters


def too_many(wait: int, what: str) -> JSONResponse:
    return JSONResponse({"status": "error", "reason": f"too many {what} requests; retry after {wait} s"},
                        status_code=429, headers={"Retry-After": str(wait)})


def predict_limit(request: Request) -> int | None:
    """Seconds to wait before this principal may predict again, or None."""
    principal = request.state.principal
    rate = request.app.state.node.settings.security.predict_rate
    return limiter(request.app, "predict", rate).hit(("principal", principal.user_id))
