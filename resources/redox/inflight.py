"""How many requests one client keeps in flight: enough to spend the rate budget at Redox's latency.

By Little's law a client that wants ``R`` answers per second from a server that takes ``L`` seconds
per answer needs ``R x L`` requests outstanding. A fixed count cannot be right for both the sandbox
(milliseconds) and Redox proxying to an EHR (FHIR p50 0.4 s / p99 3 s, Data Model p50 1.5 s /
p99 10 s), so the bound follows the latency this client observes.

Invariants kept here:
- the bound is ``ceil(rate x latency x HEADROOM)`` clamped to ``[lower, upper]``, where ``rate`` is
  the budget's spendable requests per second and ``latency`` a smoothed, tail-weighted estimate of
  recent round trips; the rate itself is never this module's business: the shared budget alone
  decides when a request may leave, so a bound that is too high only makes requests wait there;
- a round trip is timed from the moment the budget granted its slot to the end of the body, never
  including the wait for that slot: counting it would let a larger bound inflate the estimate that
  sets the bound;
- slots are handed out first come, first served, with no barging: anyio's ``CapacityLimiter`` keeps
  a FIFO wait queue, hands a freed token straight to the oldest waiter and admits no newcomer while
  anyone waits, and its ``total_tokens`` may change at any time (raising it wakes waiters in order,
  lowering it cancels nothing in flight, it only admits no one until enough finish).
"""

import collections
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Iterator

import anyio

# Above 1 so the budget, not the bound, is what stops requests: with the bound exactly at rate x
# latency, any jitter in pacing or latency leaves the budget unspent.
HEADROOM = 1.5
# Never fewer: even at loopback latency a few requests in flight hide the client's own overhead.
LOWER = 4
# What the bound assumes before the first answer arrives. A second is between Redox's FHIR and Data
# Model medians: a run starts with a few dozen requests in flight, and the first answers correct it.
PRIOR_LATENCY_S = 1.0
# Recent round trips considered, and how fast the estimate follows them (per answer): at Redox's
# 25 requests/s the window is the last ~2.5 s and the estimate settles within a few seconds.
WINDOW = 64
QUANTILE = 0.9
SMOOTHING = 0.2


def in_flight_target(*, rate_per_s: float, latency_s: float, lower: int, upper: int) -> int:
    """Requests to keep outstanding so ``rate_per_s`` answers per second taking ``latency_s`` each flow."""
    lower = min(lower, upper)
    # Rounded first, so float noise (100 x 0.2 x 1.5 = 30.000000000000004) does not add a request.
    wanted = math.ceil(round(rate_per_s * latency_s * HEADROOM, 6))
    return max(lower, min(upper, wanted))


class LatencyEstimate:
    """A smoothed, tail-weighted round-trip time: an EWMA of ``max(mean, p90)`` of the last answers.

    The p90 covers the long tail of one endpoint (a slot is held for the slow answers too); the mean
    covers a mix where a few very slow queries (Data Model) hide behind many fast ones, which the p90
    alone would miss while those few hold most of the slots.
    """

    def __init__(self, *, prior_s: float = PRIOR_LATENCY_S, window: int = WINDOW) -> None:
        self.seconds = prior_s
        self._recent: collections.deque[float] = collections.deque(maxlen=window)

    def observe(self, seconds: float) -> float:
        first = not self._recent
        self._recent.append(max(0.0, seconds))
        ordered = sorted(self._recent)
        tail = ordered[min(len(ordered) - 1, math.ceil(QUANTILE * len(ordered)) - 1)]
        recent = max(tail, sum(ordered) / len(ordered))
        # The prior is only a guess: the first real answer replaces it outright.
        self.seconds = recent if first else self.seconds + SMOOTHING * (recent - self.seconds)
        return self.seconds


@dataclasses.dataclass(frozen=True, slots=True)
class InFlightStats:
    """A snapshot for logs and metadata: the bound, its use, and the latency it was sized for."""

    target: int
    holding: int
    waiting: int
    on_wire: int
    peak_on_wire: int
    latency_s: float
    rate_per_s: float


class Trip:
    """One round trip on the wire; ``seconds`` is set when it ends."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0


class InFlight:
    """The adaptive bound on one client's requests in flight.

    ``async with in_flight.slot():`` around everything a request does once it has its turn (taking
    a budget slot, then the round trip); ``with in_flight.on_wire() as trip:`` around the round trip
    alone, which times it and resizes the bound.
    """

    def __init__(
        self,
        *,
        rate_per_s: float,
        upper: int,
        lower: int = LOWER,
        estimate: LatencyEstimate | None = None,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.upper = upper
        self.lower = min(lower, upper)
        self.estimate = estimate or LatencyEstimate()
        self._limiter = anyio.CapacityLimiter(self._target())
        self._on_wire = 0
        self._peak_on_wire = 0

    def _target(self) -> int:
        return in_flight_target(
            rate_per_s=self.rate_per_s, latency_s=self.estimate.seconds, lower=self.lower, upper=self.upper
        )

    @property
    def target(self) -> int:
        return int(self._limiter.total_tokens)

    def observe(self, seconds: float) -> int:
        """Feed one round trip's duration; returns the bound it leads to."""
        self.estimate.observe(seconds)
        target = self._target()
        if target != self._limiter.total_tokens:
            self._limiter.total_tokens = target
        return target

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        # A borrower per request, not per task: one task may hold a slot while another request
        # of its own (a token refresh) waits for one.
        borrower = object()
        await self._limiter.acquire_on_behalf_of(borrower)
        try:
            yield
        finally:
            self._limiter.release_on_behalf_of(borrower)

    @contextlib.contextmanager
    def on_wire(self) -> Iterator[Trip]:
        trip = Trip()
        self._on_wire += 1
        self._peak_on_wire = max(self._peak_on_wire, self._on_wire)
        started = time.perf_counter()
        completed = False
        try:
            yield trip
            completed = True
        except Exception:
            # A timeout or a dropped connection held its slot as long as an answer would have.
            completed = True
            raise
        finally:
            self._on_wire -= 1
            trip.seconds = time.perf_counter() - started
            # A cancelled request says nothing about the server's latency.
            if completed:
                self.observe(trip.seconds)

    def stats(self) -> InFlightStats:
        limiter = self._limiter.statistics()
        return InFlightStats(
            target=self.target,
            holding=limiter.borrowed_tokens,
            waiting=limiter.tasks_waiting,
            on_wire=self._on_wire,
            peak_on_wire=self._peak_on_wire,
            latency_s=self.estimate.seconds,
            rate_per_s=self.rate_per_s,
        )
