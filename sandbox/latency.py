"""How long the sandbox takes to answer, and Redox's two limits on a synchronous answer.

Real Redox proxies every clinical request to an EHR: a FHIR search answers in hundreds of
milliseconds to seconds, a Data Model query slower still, and the tail is long. ``LatencySpec``
describes that per endpoint kind as a log-normal draw fixed by its median and 99th percentile
(``fhir=400ms/3s,datamodel=1500ms/10s``); ``Pacer`` draws from it with its own seeded RNG and
applies Redox's limits to Data Model answers:

- an answer holding more than ``max_response_records`` records is refused with 413 (Redox refuses
  payloads over 10 MB; the default cap is that size over a Results record's typical size);
- an answer whose modeled round trip (the latency draw plus ``record`` seconds per record it holds)
  exceeds ``round_trip_limit`` waits that limit and ends in 504 (Redox ends a sync round trip after
  "a couple of minutes", 120 s).

Invariants:
- ``none`` (the default) draws nothing and waits nothing: the sandbox answers as fast as it can and
  no round trip can time out;
- auth token endpoints and ``/sandbox/*`` admin endpoints never wait;
- draws come from one ``random.Random`` seeded from the spec (``seed=N``) or the world seed, one draw
  per clinical request, so the same request sequence meets the same latencies; draws and the limit
  counters are taken under a lock (Data Model answers are judged in a worker thread);
- waits are ``asyncio.sleep`` in the app, so a waiting answer holds no thread; ``waiting`` counts the
  answers now waiting and ``peak_waiting`` the most at once.
"""

import asyncio
import dataclasses
import math
import random
import threading
from typing import Final, Literal

from sandbox.faults import parse_duration

Kind = Literal["fhir.search", "fhir.read", "datamodel.query", "datamodel.patientsearch"]
KINDS: Final[tuple[Kind, ...]] = ("fhir.search", "fhir.read", "datamodel.query", "datamodel.patientsearch")
# The 99th percentile of a standard normal: a log-normal with median m and 99th percentile q has
# sigma = ln(q / m) / Z99.
Z99: Final = 2.3263478740408408
# Redox's documented limits: 413 over 10 MB (the older error page; the quotas page says 40 MB for
# API traffic), 504 after "a couple of minutes" (a sync query's round trip must end within 120 s).
PAYLOAD_LIMIT_BYTES: Final = 10 * 1024 * 1024
# A record renders to about 380 bytes of JSON in a Results.Query answer (a result with its share of
# the order around it), 730 in a VisitQuery and 1,000 in a Booked answer; 700 bytes is taken as
# typical, so the cap is 10 MB / 700 B, rounded down: 14,000 records.
RECORD_BYTES: Final = 700
DEFAULT_MAX_RESPONSE_RECORDS: Final = PAYLOAD_LIMIT_BYTES // RECORD_BYTES // 1000 * 1000
DEFAULT_ROUND_TRIP_LIMIT: Final = 120.0
# What the EHR behind Redox spends per record it puts in a Data Model answer under ``realistic``:
# 5 ms, so a hospital day of Results (~20,000 records) takes about 100 s before the latency draw.
REALISTIC_RECORD_SECONDS: Final = 0.005


@dataclasses.dataclass(frozen=True)
class Spread:
    """A log-normal latency fixed by its median and 99th percentile, in seconds."""

    p50: float
    p99: float

    def __post_init__(self) -> None:
        if self.p50 < 0 or self.p99 < self.p50:
            raise ValueError("latency needs 0 <= p50 <= p99")

    def draw(self, rng: random.Random) -> float:
        if self.p50 <= 0:
            return 0.0
        sigma = math.log(self.p99 / self.p50) / Z99
        return self.p50 if sigma == 0 else rng.lognormvariate(math.log(self.p50), sigma)

    def text(self) -> str:
        return f"{self.p50:g}s/{self.p99:g}s"


ZERO: Final = Spread(0.0, 0.0)
PRESETS: Final = {
    "realistic": "fhir=400ms/3s,datamodel=1500ms/10s,record=5ms",
}


@dataclasses.dataclass(frozen=True)
class LatencySpec:
    """Per-kind latencies and the per-record cost of a Data Model answer; all zero means ``none``."""

    spreads: tuple[tuple[Kind, Spread], ...] = ()
    record_seconds: float = 0.0
    seed: int | None = None

    @property
    def active(self) -> bool:
        return self.record_seconds > 0 or any(s.p50 > 0 for _, s in self.spreads)

    def spread(self, kind: Kind) -> Spread:
        return dict(self.spreads).get(kind, ZERO)

    @classmethod
    def parse(cls, spec: str | None) -> "LatencySpec":
        """``none``, ``realistic`` or ``KEY=P50/P99,...``: keys ``fhir`` (search and read),
        ``fhir.search``, ``fhir.read``, ``datamodel`` (every query), ``datamodel.query``,
        ``datamodel.patientsearch``; ``record=DUR`` (per record in a Data Model answer); ``seed=N``.
        A single duration (``fhir=1s``) is a fixed latency. Later keys override earlier ones."""
        text = (spec or "").strip().lower()
        if text in ("", "none", "off", "0"):
            return cls()
        text = PRESETS.get(text, text)
        spreads: dict[Kind, Spread] = {}
        record = 0.0
        seed: int | None = None
        groups: dict[str, tuple[Kind, ...]] = {
            "fhir": ("fhir.search", "fhir.read"),
            "datamodel": ("datamodel.query", "datamodel.patientsearch"),
            **{kind: (kind,) for kind in KINDS},
        }
        for part in text.split(","):
            key, sep, raw = part.strip().partition("=")
            if not sep:
                raise ValueError(f"latency {part!r} needs a value, e.g. fhir=400ms/3s")
            if key == "seed":
                seed = int(raw)
            elif key == "record":
                record = parse_duration(raw)
            elif key in groups:
                low, slash, high = raw.partition("/")
                p50 = parse_duration(low)
                spread = Spread(p50, parse_duration(high) if slash else p50)
                for kind in groups[key]:
                    spreads[kind] = spread
            else:
                raise ValueError(
                    f"unknown latency key {key!r}; known: {', '.join(groups)}, record, seed "
                    "(or a preset: none, realistic)"
                )
        return cls(tuple(sorted(spreads.items())), record, seed)

    def text(self) -> str:
        if not self.active:
            return "none"
        parts = [f"{kind}={spread.text()}" for kind, spread in self.spreads]
        return ",".join([*parts, f"record={self.record_seconds:g}s"])


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What to do with an answer: wait ``wait`` seconds, then send it, or send ``status`` instead."""

    wait: float
    status: int | None = None
    text: str = ""


class Pacer:
    """The latency draws and Redox's answer limits of one sandbox. ``draw`` and ``judge`` may be
    called from any thread; ``wait`` and its counters belong to the event loop."""

    def __init__(
        self,
        spec: LatencySpec,
        *,
        seed: int,
        max_response_records: int = DEFAULT_MAX_RESPONSE_RECORDS,
        round_trip_limit: float = DEFAULT_ROUND_TRIP_LIMIT,
    ) -> None:
        if max_response_records < 1 or round_trip_limit <= 0:
            raise ValueError("max_response_records and round_trip_limit must be positive")
        self.spec = spec
        self.max_response_records = max_response_records
        self.round_trip_limit = round_trip_limit
        self._rng = random.Random(f"redox-sandbox-latency:{spec.seed if spec.seed is not None else seed}")
        self.waiting = 0
        self.peak_waiting = 0
        self.refused_oversize = 0
        self.round_trip_timeouts = 0
        self._lock = threading.Lock()

    def draw(self, kind: Kind) -> float:
        if not self.spec.active:
            return 0.0
        with self._lock:
            return self.spec.spread(kind).draw(self._rng)

    def judge(self, kind: Kind, records: int) -> Verdict:
        """The wait and fate of a Data Model answer holding ``records`` records."""
        latency = self.draw(kind)
        round_trip = latency + records * self.spec.record_seconds
        if round_trip > self.round_trip_limit:
            with self._lock:
                self.round_trip_timeouts += 1
            return Verdict(
                self.round_trip_limit,
                504,
                f"Timeout: the destination did not answer within {self.round_trip_limit:g} seconds. "
                "Query a shorter window",
            )
        if records > self.max_response_records:
            with self._lock:
                self.refused_oversize += 1
            return Verdict(
                latency,
                413,
                f"Payload too large: the response would hold {records} records, more than the limit "
                f"of {self.max_response_records}. Query a shorter window",
            )
        return Verdict(round_trip)

    async def wait(self, seconds: float) -> None:
        """Sleep without holding the loop, counted in ``waiting`` and ``peak_waiting``."""
        if seconds <= 0:
            return
        self.waiting += 1
        self.peak_waiting = max(self.peak_waiting, self.waiting)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.waiting -= 1

    def reset_counters(self) -> None:
        self.peak_waiting = self.waiting
        with self._lock:
            self.refused_oversize = 0
            self.round_trip_timeouts = 0

    def stats(self) -> dict[str, object]:
        return {
            "spec": self.spec.text(),
            "waiting": self.waiting,
            "peak_waiting": self.peak_waiting,
        }
