"""The world and its clock: ``build`` fills a store with a seeded population and its clinical
history, and ``World.advance`` moves the clock and lets things happen (new patients and visits,
reschedules, cancellations, corrected results, records entered in error).

Invariants:
- determinism: the same ``PopulationConfig`` (after defaults are resolved) gives the same world,
  record for record and byte for byte, and the same sequence of ``advance`` calls gives the same
  changes. Build and advance draw from their own seeded streams; nothing reads the global random
  state, the wall clock (except to default ``end`` to today and ``clock`` to now) or ``uuid4``;
- build timestamps: each record's first ``last_updated`` is backdated to when it would plausibly
  have been written (a visit's end plus a little, a result's collection plus hours, a booking weeks
  before its slot), never later than the start clock, which is never later than the wall clock
  (``PopulationConfig.clock``); ``advance`` writes at event times inside
  (old clock, new clock];
- ``advance`` and ``truth`` hold the world's lock, so server threads see one change at a time.
"""

import contextlib
import dataclasses
import gc
import heapq
import itertools
import random
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo

import polars as pl

from sandbox.model import Appointment, Encounter, Kind, Patient, Person, Record, Result, Surface
from sandbox.population.clinic import CLASSES, Clinic
from sandbox.population.draws import Vec, const, poisson, poisson_vec, repeat
from sandbox.population.epoch import DAY, dt, dts, ts
from sandbox.population.ids import SURFACES, Ids
from sandbox.population.noise import new_address
from sandbox.population.people import make_people
from sandbox.population.profiles import DEFAULT_RATES, Rates, profile
from sandbox.population.records import FRAME_KINDS, to_patients, to_persons, to_records
from sandbox.population.truth import truth_frames
from sandbox.store import Store

# Clinical rates per surface patient: ``PopulationConfig.rates`` (sandbox/population/profiles.py).
FUTURE_DAYS: Final = 30  # booked appointments reach this far past the clock


# Per day of advance: changes relative to the number of surface patients (or results).
_NEW_PERSONS_PER_DAY: Final = 0.0015
_RESCHEDULE_PER_DAY: Final = 0.004
_CANCEL_PER_DAY: Final = 0.003
_CORRECT_PER_DAY: Final = 0.0005  # of results
_ERROR_PER_DAY: Final = 0.001
_PATIENT_UPDATE_PER_DAY: Final = 0.002

CHANGE_KINDS: Final = (
    "new_persons",
    "new_patients",
    "new_encounters",
    "new_results",
    "new_appointments",
    "rescheduled",
    "cancelled",
    "corrected",
    "entered_in_error",
    "finished_encounters",
    "appointments_completed",
    "results_finalized",
    "patients_updated",
)


@dataclasses.dataclass(frozen=True)
class PopulationConfig:
    """What the sandbox world looks like. ``end`` defaults to today (UTC), ``start`` to 90 days
    before ``end``; the world's clock starts at the end of ``end`` (midnight UTC after it) or, when
    that midnight is still to come, at ``clock`` (default: now, to the second). So the world built
    for a range reaching today holds what happened up to now, and no record is stamped later than
    the wall clock: a record written "at tonight's midnight" would look like it came from the future.
    """

    seed: int = 7
    patients: int = 1000  # number of Persons
    start: date | None = None
    end: date | None = None
    fhir_tz: str = "America/New_York"
    clock: datetime | None = None  # "now" for a range that reaches it; resolved() fills it in
    # ``clinic`` or ``hospital`` (profiles.py): sets ``patients`` and the daily rates.
    profile: str | None = None

    @property
    def rates(self) -> Rates:
        return profile(self.profile).rates if self.profile else DEFAULT_RATES

    def resolved(self) -> "PopulationConfig":
        now = self.clock or datetime.now(UTC).replace(microsecond=0)
        if now.tzinfo is None:
            raise ValueError("PopulationConfig.clock must be timezone-aware")
        end = self.end or now.astimezone(UTC).date()
        start = self.start or end - timedelta(days=90)
        if start > end:
            raise ValueError("PopulationConfig.start is after end")
        if start > now.astimezone(UTC).date():
            raise ValueError(
                f"PopulationConfig.start ({start}) is after today ({now.astimezone(UTC).date()}): "
                "the sandbox holds only what has already happened"
            )
        midnight_after_end = datetime.combine(end + timedelta(days=1), datetime.min.time(), UTC)
        clock = min(midnight_after_end, now.astimezone(UTC))
        persons = profile(self.profile).persons if self.profile else self.patients
        return dataclasses.replace(self, start=start, end=end, clock=clock, patients=persons)


# Heap events: (time, tiebreak, what, surface, source_id, payload). The tiebreak is unique, so
# payloads are never compared.
_Event = tuple[int, int, str, str, str, object]


# Walk-in mix for visits that start "now" during advance (no one is admitted for a week by booking).
_WALK_IN: Final = {"ambulatory": 60, "emergency": 15, "inpatient": 5, "observation": 5, "virtual": 15}


class World:
    """The synthetic world: persons (truth), the store both surfaces serve, and the clock's future.

    ``persons`` maps person_id to Person; ``patients_of`` maps person_id to its surface patients'
    (surface, source_id); ``groups`` maps a hard-group id to its member person_ids. ``clock0`` is
    where the clock started (the end of the configured range, or now if that is later).
    """

    def __init__(self, config: PopulationConfig) -> None:
        self.config = config.resolved()
        assert self.config.start is not None and self.config.end is not None
        self.start_at = datetime.combine(self.config.start, datetime.min.time(), UTC)
        assert self.config.clock is not None
        self.clock0 = self.config.clock
        self.store = Store(self.clock0)
        self.persons: dict[str, Person] = {}
        self.patients_of: dict[str, list[tuple[Surface, str]]] = {}
        self.groups: dict[str, list[str]] = {}
        self._ids = Ids.of(self.config.seed)
        self._clinic = Clinic(self._ids, ZoneInfo(self.config.fhir_tz), self.config.seed)
        self._use_stream("build")
        self._events: list[_Event] = []
        self._tiebreak = itertools.count()
        self._next_person = 0
        self._next_patient = {"fhir": 0, "datamodel": 0}
        self._patient_ids: dict[Surface, list[str]] = {"fhir": [], "datamodel": []}
        # Every record id, per kind and surface, in creation order: what random changes pick from.
        self._record_ids: dict[tuple[Kind, Surface], list[str]] = {}
        # Booked appointments whose slot has not come yet (pruned lazily when picked).
        self._booked: list[tuple[Surface, str]] = []
        # advance and truth may be called from server worker threads; one at a time.
        self._lock = threading.RLock()

    def _use_stream(self, name: str) -> None:
        self._rng = random.Random(f"redox-sandbox:{self.config.seed}:{name}")
        self._vec = Vec(self._rng)

    @property
    def clock(self) -> datetime:
        return self.store.clock

    # -- building -------------------------------------------------------------------------------

    def _schedule(
        self, at: int, what: str, surface: str = "", source_id: str = "", payload: object = None
    ) -> None:
        heapq.heappush(self._events, (at, next(self._tiebreak), what, surface, source_id, payload))

    def _put(self, kind: Kind, record: Record, at: int | None = None) -> None:
        self.store.put(kind, record, at=None if at is None else dt(at))
        if kind == "patients":
            assert isinstance(record, Patient)
            self.patients_of[record.person_id].append((record.surface, record.source_id))
            self._patient_ids[record.surface].append(record.source_id)
        else:
            self._record_ids.setdefault((kind, record.surface), []).append(record.source_id)

    def _add_people(self, count: int) -> list[Patient]:
        """Make ``count`` persons and their patient copies (not yet stored), in person order."""
        batch = make_people(
            self._rng,
            self._ids,
            first_person=self._next_person,
            count=count,
            fhir_start=self._next_patient["fhir"],
            dm_start=self._next_patient["datamodel"],
            today=self.clock.date(),
        )
        self._next_person += count
        self._next_patient["fhir"] += batch.fhir_count
        self._next_patient["datamodel"] += batch.dm_count
        order: dict[str, int] = {}
        for person, group_id in zip(
            to_persons(batch.persons), batch.persons["group_id"].to_list(), strict=True
        ):
            order[person.person_id] = len(order)
            self.persons[person.person_id] = person
            self.patients_of[person.person_id] = []
            if group_id is not None:
                self.groups.setdefault(group_id, []).append(person.person_id)
        patients = to_patients(batch.patients)
        patients.sort(key=lambda p: (order[p.person_id], p.surface != "fhir"))
        return patients

    def _put_batch(self, kind: Kind, frame: pl.DataFrame, *, at: list[int] | None = None) -> None:
        """Store a batch frame's records, each at its ``updated`` time (build) or schedule each to
        appear at ``at[i]`` (advance), with the follow-up events its state implies."""
        cls, fields = FRAME_KINDS[kind]
        records = to_records(frame, cls, fields)
        follow = frame["finishes"].to_list() if kind == "encounters" else [None] * len(records)
        if at is not None:
            for record, when, finishes in zip(records, at, follow, strict=True):
                self._schedule(when, "put", record.surface, record.source_id, (kind, record, finishes))
            return
        self._put_new(kind, records, dts(frame["updated"].to_list()))  # type: ignore[arg-type]
        rng = self._rng
        now = ts(self.clock)
        # Only these states have follow-ups; skipping the rest up front keeps the loop short.
        if kind == "encounters":
            needs = frame["finishes"].is_not_null()
        else:
            needs = frame["status"] == ("preliminary" if kind == "results" else "booked")
        for record, finishes in itertools.compress(zip(records, follow, strict=True), needs.to_list()):
            self._follow_up(kind, record, finishes, now, rng)

    def _put_new(self, kind: Kind, records: list[Record], stamps: list[datetime]) -> None:
        """``_put`` for a batch of new records, in order (storing draws nothing from the rng, so
        storing a batch before its follow-ups changes no draw)."""
        self.store.put_new(kind, records, stamps)
        if kind == "patients":
            for patient in records:
                assert isinstance(patient, Patient)
                self.patients_of[patient.person_id].append((patient.surface, patient.source_id))
        for surface in SURFACES:
            ids = [r.source_id for r in records if r.surface == surface]
            if kind == "patients":
                self._patient_ids[surface].extend(ids)
            elif ids:
                self._record_ids.setdefault((kind, surface), []).extend(ids)

    def _follow_up(
        self, kind: Kind, record: Record, finishes: int | None, now: int, rng: random.Random
    ) -> None:
        if kind == "encounters" and finishes is not None:
            self._schedule(finishes, "finish", record.surface, record.source_id)
        elif kind == "results" and record.status == "preliminary":  # type: ignore[union-attr]
            assert isinstance(record, Result)
            due = max(now + 60, ts(record.effective_at) + rng.randint(12 * 3600, 48 * 3600))
            self._schedule(due, "finalize", record.surface, record.source_id)
        elif kind == "appointments" and record.status == "booked":  # type: ignore[union-attr]
            assert isinstance(record, Appointment)
            self._booked.append((record.surface, record.source_id))
            self._schedule(ts(record.end_at), "complete", record.surface, record.source_id)

    def _build(self) -> None:
        patients = self._add_people(self.config.patients)
        lo, now = ts(self.start_at), ts(self.clock)
        rng, v, clinic = self._rng, self._vec, self._clinic
        stamps = [rng.randrange(lo, now) if now > lo else now for _ in patients]
        self._put_new("patients", patients, dts(stamps))  # type: ignore[arg-type]
        owners = pl.DataFrame(
            {"surface": [p.surface for p in patients], "patient": [p.source_id for p in patients]},
            schema={"surface": pl.String(), "patient": pl.String()},
        )
        n, days = owners.height, (now - lo) / DAY
        rates = self.config.rates

        visits = repeat(owners, poisson_vec(v, n, rates.encounters_per_90d * days / 90))
        m = visits.height
        frame = clinic.encounters(v, visits, lo=const(m, lo), hi=const(m, now), now=const(m, now))
        self._put_batch("encounters", frame)

        labs = repeat(owners, poisson_vec(v, n, rates.draws_per_90d * days / 90))
        m = labs.height
        slot = clinic.slots(v, const(m, lo), const(m, now))
        any_time = lo + (v.u(m) * (now - lo)).floor().cast(pl.Int64)
        effective = pl.select(
            pl.when(pl.lit(v.u(m)) < 0.65).then(pl.lit(slot)).otherwise(pl.lit(any_time))
        ).to_series()
        if rates.orders_per_draw > 1:
            # Several panels from one draw: the same patient and collection time, one order each.
            draw = pl.int_range(m, eager=True).repeat_by(rates.orders_per_draw).explode()
            labs, effective = labs[draw], effective.gather(draw)
            m = labs.height
        self._put_batch("results", clinic.orders(v, labs, effective=effective, now=const(m, now)))

        horizon = now + FUTURE_DAYS * DAY
        booked = repeat(owners, poisson_vec(v, n, rates.appointments_per_90d * (horizon - lo) / DAY / 90))
        m = booked.height
        start = clinic.slots(v, const(m, lo), const(m, horizon))
        self._put_batch("appointments", clinic.appointments(v, booked, start=start, now=const(m, now)))
        # Advance draws from its own stream, so a world advanced after build is reproducible
        # whatever build consumed.
        self._use_stream("advance")

    # -- advancing ------------------------------------------------------------------------------

    def advance(self, delta: timedelta) -> dict[str, int]:
        """Move the clock forward by ``delta`` and write what happened meanwhile, each change a new
        version stamped at its own time in (old clock, new clock]. Returns counts per change kind."""
        if delta < timedelta(0):
            raise ValueError("the sandbox clock only moves forward")
        with self._lock:
            return self._advance(delta)

    def _advance(self, delta: timedelta) -> dict[str, int]:
        counts = dict.fromkeys(CHANGE_KINDS, 0)
        old = self.clock
        new = old + delta
        lo, hi = ts(old), ts(new)
        if hi > lo:
            self._plan(lo, hi, delta / timedelta(days=1), counts)
        while self._events and self._events[0][0] <= hi:
            at, _, what, surface, sid, payload = heapq.heappop(self._events)
            self.store.clock = max(old, dt(at))
            self._apply(what, surface, sid, payload, at, counts)  # type: ignore[arg-type]
        self.store.clock = new
        return counts

    def _plan(self, lo: int, hi: int, days: float, counts: dict[str, int]) -> None:
        """Draw what happens in (lo, hi]: new people and visits are made now, in batches, and
        scheduled to appear at their times; state changes are scheduled and decided when due."""
        rng, v, clinic = self._rng, self._vec, self._clinic
        n_patients = sum(len(ids) for ids in self._patient_ids.values())
        n_results = sum(len(self._record_ids.get(("results", s), ())) for s in SURFACES)

        def times(per_day: float) -> list[int]:
            return sorted(lo + rng.randint(1, hi - lo) for _ in range(poisson(rng, per_day * days)))

        for what, per_day in (
            ("reschedule", _RESCHEDULE_PER_DAY * n_patients),
            ("cancel", _CANCEL_PER_DAY * n_patients),
            ("correct", _CORRECT_PER_DAY * n_results),
            ("error", _ERROR_PER_DAY * n_patients),
            ("patient_update", _PATIENT_UPDATE_PER_DAY * n_patients),
        ):
            for at in times(per_day):
                self._schedule(at, what)

        # Visits of existing patients (picked before anyone new exists).
        rates = self.config.rates
        visit_at = times(rates.encounters_per_90d / 90 * n_patients) if n_patients else []
        order_at = times(rates.draws_per_90d / 90 * n_patients) if n_patients else []
        book_at = times(rates.appointments_per_90d / 90 * n_patients) if n_patients else []
        visitors = [self._random_patient() for _ in visit_at]
        orderers = [self._random_patient() for _ in order_at]
        bookers = [self._random_patient() for _ in book_at]
        if rates.orders_per_draw > 1:
            k = rates.orders_per_draw
            orderers = [who for who in orderers for _ in range(k)]
            order_at = [at for at in order_at for _ in range(k)]

        # New persons: their patients appear at their own times, then come in for a first visit and
        # often book a follow-up.
        person_at = times(_NEW_PERSONS_PER_DAY * len(self.persons))
        counts["new_persons"] = len(person_at)
        if person_at:
            fresh = self._add_people(len(person_at))
            people = dict.fromkeys(p.person_id for p in fresh)
            created_at = dict(zip(people, person_at, strict=True))
            for patient in fresh:
                created = created_at[patient.person_id]
                self._schedule(created, "put", patient.surface, patient.source_id, ("patients", patient))
                visitors.append((patient.surface, patient.source_id))
                visit_at.append(created + rng.randint(300, 3600))
                if rng.random() < 0.6:
                    bookers.append((patient.surface, patient.source_id))
                    book_at.append(created + rng.randint(3600, 4 * 3600))

        if visit_at:
            m = len(visit_at)
            start = pl.Series(visit_at, dtype=pl.Int64)
            klass = v.weighted(m, [_WALK_IN[c] for c in CLASSES])
            frame = clinic.encounters(
                v, _owners(visitors), lo=start, hi=start, now=start, start=start, klass=klass
            )
            self._put_batch("encounters", frame, at=visit_at)
        if order_at:
            t = pl.Series(order_at, dtype=pl.Int64)
            frame = clinic.orders(v, _owners(orderers), effective=t, now=t)
            # An order's results all land together, at the order's time.
            order_of = dict(
                zip(frame["order_id"].unique(maintain_order=True).to_list(), order_at, strict=True)
            )
            self._put_batch("results", frame, at=[order_of[o] for o in frame["order_id"].to_list()])
        if book_at:
            t = pl.Series(book_at, dtype=pl.Int64)
            start = clinic.slots(v, t + DAY, t + 60 * DAY)
            frame = clinic.appointments(v, _owners(bookers), start=start, now=t, booked_at=t)
            self._put_batch("appointments", frame, at=book_at)

    def _random_patient(self) -> tuple[Surface, str]:
        fhir, dm = self._patient_ids["fhir"], self._patient_ids["datamodel"]
        i = self._rng.randrange(len(fhir) + len(dm))
        return ("fhir", fhir[i]) if i < len(fhir) else ("datamodel", dm[i - len(fhir)])

    def _pick(self, kind: Kind) -> tuple[Surface, str] | None:
        """A random existing record of ``kind``, from either surface in proportion to its size."""
        fhir = self._record_ids.get((kind, "fhir"), [])
        dm = self._record_ids.get((kind, "datamodel"), [])
        if not fhir and not dm:
            return None
        i = self._rng.randrange(len(fhir) + len(dm))
        return ("fhir", fhir[i]) if i < len(fhir) else ("datamodel", dm[i - len(fhir)])

    def _pick_booked(self, now: int) -> Appointment | None:
        """A random booked appointment more than an hour away, or None."""
        while self._booked:
            i = self._rng.randrange(len(self._booked))
            surface, sid = self._booked[i]
            appt = self._current("appointments", surface, sid)
            assert isinstance(appt, Appointment)
            if appt.status == "booked" and ts(appt.start_at) > now + 3600:
                return appt
            self._booked[i] = self._booked[-1]
            self._booked.pop()
        return None

    def _current(self, kind: Kind, surface: Surface, source_id: str) -> Record:
        version = self.store.current(kind, surface, source_id)
        assert version is not None
        return version.record

    def _apply(
        self, what: str, surface: Surface, sid: str, payload: object, at: int, counts: dict[str, int]
    ) -> None:
        """Carry out one due event at time ``at`` (the store clock is already there)."""
        rng = self._rng
        if what == "put":
            assert isinstance(payload, tuple)
            made, record = payload[0], payload[1]
            self._put(made, record)
            counts[f"new_{made}"] += 1
            finishes = None
            if made == "encounters":
                assert isinstance(record, Encounter)
                # Walk-ins were drawn as in progress; they finish after their drawn length.
                finishes = payload[2]
            self._follow_up(made, record, finishes, at, rng)
        elif what in ("reschedule", "cancel"):
            appt = self._pick_booked(at)
            if appt is None:
                return
            if what == "cancel":
                self._put("appointments", dataclasses.replace(appt, status="cancelled"))
                counts["cancelled"] += 1
                return
            old_start = ts(appt.start_at)
            start = self._clinic.slots(self._vec, const(1, at + 3600), const(1, old_start + 21 * DAY))[0]
            if start == old_start:
                return
            end = start + 60 * appt.duration_min
            self._put("appointments", dataclasses.replace(appt, start_at=dt(start), end_at=dt(end)))
            self._schedule(end, "complete", appt.surface, appt.source_id)
            counts["rescheduled"] += 1
        elif what == "correct":
            for _ in range(5):
                picked = self._pick("results")
                if picked is None:
                    return
                result = self._current("results", *picked)
                assert isinstance(result, Result)
                if result.status == "final" and result.value_num is not None:
                    value, flag = Clinic.lab_value(rng, result.code)
                    corrected = dataclasses.replace(
                        result, status="corrected", value_num=value, abnormal_flag=flag
                    )
                    self._put("results", corrected)
                    counts["corrected"] += 1
                    return
        elif what == "error":
            kind: Kind = rng.choice(("encounters", "results", "appointments"))
            picked = self._pick(kind)
            if picked is None:
                return
            record = self._current(kind, *picked)
            assert isinstance(record, Encounter | Result | Appointment)
            if record.status != "entered-in-error":
                self._put(kind, dataclasses.replace(record, status="entered-in-error"))
                counts["entered_in_error"] += 1
        elif what == "patient_update":
            patient = self._current("patients", *self._random_patient())
            assert isinstance(patient, Patient)
            line, city, state, postal = new_address(rng)
            noise = patient.noise if "moved" in patient.noise else (*patient.noise, "moved")
            moved = dataclasses.replace(
                patient,
                address_line=line,
                address_city=city,
                address_state=state,
                address_postal_code=postal,
                noise=noise,
            )
            self.store.put("patients", moved)
            counts["patients_updated"] += 1
        elif what == "finish":
            enc = self._current("encounters", surface, sid)
            assert isinstance(enc, Encounter)
            if enc.status == "in-progress":
                self._put("encounters", dataclasses.replace(enc, status="finished", end_at=dt(at)))
                counts["finished_encounters"] += 1
        elif what == "complete":
            booked = self._current("appointments", surface, sid)
            assert isinstance(booked, Appointment)
            if booked.status == "booked" and ts(booked.end_at) == at:
                status = "fulfilled" if rng.random() < 0.9 else "noshow"
                self._put("appointments", dataclasses.replace(booked, status=status))
                counts["appointments_completed"] += 1
        elif what == "finalize":
            result = self._current("results", surface, sid)
            assert isinstance(result, Result)
            if result.status == "preliminary":
                self._put("results", dataclasses.replace(result, status="final"))
                counts["results_finalized"] += 1

    # -- truth ----------------------------------------------------------------------------------

    def truth(self) -> dict[str, pl.DataFrame]:
        """The current version of every record as polars frames named like the unified schema.

        ``persons`` (person_id, surface, source_patient_id): which surface patients are one person.
        ``patients``/``encounters``/``results``/``appointments``: unified columns minus the
        ``*_source`` ones and ``source_updated_at``, plus ``last_updated`` and ``version_id``.
        Extras for diagnostics: ``hard_groups`` (group_id, person_id, hard_group) and ``noise``
        (source_surface, source_id, person_id, noise).
        """
        with self._lock, _no_gc():
            return truth_frames(self.store, self.persons, self.patients_of, self.groups)


def _owners(picks: list[tuple[Surface, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {"surface": [p[0] for p in picks], "patient": [p[1] for p in picks]},
        schema={"surface": pl.String(), "patient": pl.String()},
    )


def build(config: PopulationConfig, *, index: bool = True) -> World:
    """Generate the world ``config`` describes, with every record in its store.

    ``index=False`` leaves the store's query indexes to be built later (``world.store.refresh()``,
    or each table on its first query): a server can then listen sooner and build them meanwhile.
    """
    world = World(config)
    with _no_gc():
        world._build()
        if index:
            world.store.refresh()
        # The world lives as long as the process serves it: move it out of the collector's sight,
        # or the first full collection after building walks all of it (~0.3 s at 10k persons), and
        # so does every later one.
        gc.freeze()
    return world


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector. Building allocates a few hundred thousand long-lived,
    acyclic objects, and the collector would otherwise keep re-traversing them (about a third of
    build time) for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
