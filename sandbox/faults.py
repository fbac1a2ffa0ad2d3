"""Seeded fault injection: the failures a real Redox integration meets, at chosen rates.

A spec such as ``5xx=0.03,timeout=0.01,429=0.01,dup=0.01,malformed=0.002,slow=0.05:2s`` sets the
probability of each fault per clinical-data request (FHIR search/read, Data Model ``/endpoint``).
Auth and ``/sandbox/*`` admin endpoints never fail on purpose [I], so a test can always get a token
and read the stats that prove what was injected.

Invariants:
- decisions come from one ``random.Random`` seeded from the spec (``seed=N``) or the world seed, drawn
  in a fixed order per request, so the same request sequence meets the same faults;
- at most one of 5xx / timeout / 429 hits a request (they replace the answer); ``slow`` delays an
  otherwise normal answer; ``dup`` and ``malformed`` alter one page's records only;
- every injected fault is counted in ``counts`` (exposed by ``GET /sandbox/stats``);
- every record served broken is named in ``malformed`` (surface, resource, source id, mode), so a
  test knows exactly which records a client should have quarantined rather than loaded;
- draws and counts happen under one lock: with latency on, Data Model answers are built in a worker
  thread while FHIR answers are built on the event loop.
"""

import collections
import dataclasses
import random
import re
import threading
from typing import Literal

RequestFault = Literal["5xx", "timeout", "429"]
MalformMode = Literal["wrong-type", "missing-required", "bad-date"]
MALFORM_MODES: tuple[MalformMode, ...] = ("wrong-type", "missing-required", "bad-date")
FaultSurface = Literal["fhir", "datamodel"]
SERVER_ERRORS = (500, 502, 504)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


def parse_duration(text: str) -> float:
    """``2s``, ``500ms``, ``1m`` or a bare number of seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 2s, 500ms, 1m)")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value / 1000 if unit == "ms" else value * 60 if unit == "m" else value


@dataclasses.dataclass(frozen=True)
class FaultSpec:
    server_error: float = 0.0
    timeout: float = 0.0
    # How long a "timeout" hangs before the 504 Redox documents after "a couple of minutes".
    timeout_seconds: float = 120.0
    too_many: float = 0.0
    dup: float = 0.0
    malformed: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 2.0
    seed: int | None = None

    @classmethod
    def parse(cls, spec: str | None) -> "FaultSpec":
        if not spec or spec.strip().lower() in ("", "off", "none"):
            return cls()
        names = {
            "5xx": "server_error",
            "timeout": "timeout",
            "429": "too_many",
            "dup": "dup",
            "malformed": "malformed",
            "slow": "slow",
        }
        values: dict[str, float | int] = {}
        for part in spec.split(","):
            key, sep, raw = part.strip().partition("=")
            if not sep:
                raise ValueError(f"fault {part!r} needs a value, e.g. 5xx=0.03")
            if key == "seed":
                values["seed"] = int(raw)
                continue
            if key not in names:
                raise ValueError(f"unknown fault {key!r}; known: {', '.join(names)}, seed")
            rate, _, duration = raw.partition(":")
            probability = float(rate)
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"fault {key} rate must be within 0..1, got {rate}")
            values[names[key]] = probability
            if duration:
                if key not in ("slow", "timeout"):
                    raise ValueError(f"only slow and timeout take a duration, not {key}")
                values[f"{names[key]}_seconds"] = parse_duration(duration)
        if sum(float(values.get(k, 0.0)) for k in ("server_error", "timeout", "too_many")) > 1.0:
            raise ValueError("5xx + timeout + 429 rates must not add up to more than 1")
        return cls(**values)  # type: ignore[arg-type]

    @property
    def active(self) -> bool:
        return any((self.server_error, self.timeout, self.too_many, self.dup, self.malformed, self.slow))


@dataclasses.dataclass(frozen=True)
class Malformed:
    """One record served broken. ``resource`` is a FHIR resource type, or on the Data Model ``Visit``
    (an encounter), ``Booking`` (an appointment) or ``Result`` (one per result of a broken order).
    ``source_id`` is the record's id in the sandbox's truth: on the Data Model a reused id keeps its
    own part (``{sent id}~{own id}``, sandbox/population/records.py), so it names the one record that
    broke, not every record sent under that id."""

    surface: FaultSurface
    resource: str
    source_id: str
    mode: MalformMode

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


class Faults:
    def __init__(self, spec: FaultSpec, *, seed: int) -> None:
        self.spec = spec
        self._rng = random.Random(spec.seed if spec.seed is not None else seed)
        self.counts: collections.Counter[str] = collections.Counter()
        self.malformed: list[Malformed] = []
        self._lock = threading.RLock()

    def request_fault(self) -> RequestFault | None:
        """At most one fault that replaces the whole answer."""
        with self._lock:
            if not self.spec.active:
                return None
            roll = self._rng.random()
            for name, rate in (
                ("5xx", self.spec.server_error),
                ("timeout", self.spec.timeout),
                ("429", self.spec.too_many),
            ):
                if roll < rate:
                    self.counts[name] += 1
                    return name  # type: ignore[return-value]
                roll -= rate
            return None

    def delay(self) -> float:
        with self._lock:
            if self.spec.slow and self._rng.random() < self.spec.slow:
                self.counts["slow"] += 1
                return self.spec.slow_seconds
            return 0.0

    def server_error_status(self) -> int:
        with self._lock:
            return self._rng.choice(SERVER_ERRORS)

    def duplicate(self) -> bool:
        with self._lock:
            if self.spec.dup and self._rng.random() < self.spec.dup:
                self.counts["dup"] += 1
                return True
            return False

    def malform(self, records: int) -> tuple[int, MalformMode] | None:
        """Which record of a page to break, and how; None for an intact page."""
        with self._lock:
            if records and self.spec.malformed and self._rng.random() < self.spec.malformed:
                self.counts["malformed"] += 1
                return self._rng.randrange(records), self._rng.choice(MALFORM_MODES)
            return None

    def note_malformed(self, surface: FaultSurface, resource: str, source_id: str, mode: MalformMode) -> None:
        """Name the record a ``malform`` decision broke: only the surface knows what its index points at."""
        with self._lock:
            self.malformed.append(Malformed(surface, resource, source_id, mode))

    def pick(self, n: int) -> int:
        with self._lock:
            return self._rng.randrange(n)

    def reset_counters(self) -> None:
        with self._lock:
            self.counts.clear()
            self.malformed.clear()
