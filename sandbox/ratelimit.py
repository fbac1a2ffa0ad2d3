"""Redox's rate limit: N requests per rolling window per client IP, refused with 429.

Redox documents a rolling window ("send 7,500 requests within three minutes and you only need to
wait two more minutes"), so each IP keeps a deque of the monotonic times of the requests it was
allowed; a request is refused while the deque already holds ``limit`` entries younger than the
window.

Invariants:
- only allowed requests enter the window [I]: a refused request does not extend the wait, so a
  client that keeps retrying still recovers as soon as the window rolls;
- ``peak`` is the most requests any one IP had inside one window, tracked even when limiting is off
  (then over ``window`` seconds, 300 by default), so benchmarks can prove a client stayed under it.
"""

import collections
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self,
        limit: int | None,
        window: float = 300.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._hits: dict[str, collections.deque[float]] = {}
        self.peak: dict[str, int] = {}
        self.refused = 0

    def allow(self, ip: str) -> bool:
        now = self._clock()
        hits = self._hits.get(ip)
        if hits is None:
            hits = self._hits[ip] = collections.deque()
        horizon = now - self.window
        while hits and hits[0] <= horizon:
            hits.popleft()
        if self.limit is not None and len(hits) >= self.limit:
            self.refused += 1
            return False
        hits.append(now)
        if len(hits) > self.peak.get(ip, 0):
            self.peak[ip] = len(hits)
        return True

    def retry_after(self, ip: str) -> int:
        """Seconds until the oldest request in the window rolls out (only sent with --retry-after)."""
        hits = self._hits.get(ip)
        if not hits:
            return 0
        return max(1, int(hits[0] + self.window - self._clock() + 0.999))

    def reset_counters(self) -> None:
        """Zero ``peak`` and ``refused``; the window itself is kept, as Redox would keep it."""
        self.peak.clear()
        self.refused = 0
