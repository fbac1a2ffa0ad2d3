"""The sandbox's versioned record store: every version of every record, readable as of any past write.

Invariants:
- ``seq`` numbers every write, store-wide, 1, 2, 3, ...; ``head_seq`` is the last one. A read "as of
  seq S" sees, for each record, its newest version with ``seq <= S`` and nothing else, so a reader
  that pins S (a FHIR paging cursor does) sees one consistent snapshot however much is written after.
- per record, ``version_id`` counts 1, 2, 3, ... and ``last_updated`` strictly increases;
- every datetime is timezone-aware UTC;
- versions are never changed or removed, so anything derived from (kind, surface, source_id,
  version_id) -- a query answer as of a fixed seq, a rendered body -- is valid forever. That is what
  makes the two caches here safe without invalidation.

Queries are served from per (kind, surface) indexes -- records by source_id, ids in sorted order,
(clinical time, id) and (last_updated, id) in time order, ids by patient and by identifier -- so a
one-day window or a page of ids costs a bisect plus the matching records, not a scan. Index lists
are appended on write and sorted lazily on the next read; Timsort makes re-sorting a long sorted
prefix plus a short tail nearly linear, which keeps bulk loading and small advances both cheap.
"""

import bisect
import itertools
import operator
import threading
from collections import OrderedDict
from collections.abc import Collection, Hashable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sandbox.model import (
    Appointment,
    Encounter,
    Kind,
    Patient,
    Record,
    Result,
    Surface,
    Version,
    bulk_constructor,
)

_ONE_MS = timedelta(milliseconds=1)
_ONE_US = timedelta(microseconds=1)
_KIND_OF: dict[type, Kind] = {
    Patient: "patients",
    Encounter: "encounters",
    Result: "results",
    Appointment: "appointments",
}
_NEW_VERSION = bulk_constructor(Version)
# A query answer is a list that can be as long as a whole table; this many answers are kept.
_QUERY_CACHE_SIZE = 128
# Below this many candidates from exact keys (ids, patients), checking each beats a time-index range.
_SMALL = 2048


@dataclass(frozen=True, slots=True)
class Bounds:
    """A time filter, like FHIR's ``date=ge...&date=lt...``; an unset end is open."""

    lo: datetime | None = None
    lo_inclusive: bool = True
    hi: datetime | None = None
    hi_inclusive: bool = False

    def __post_init__(self) -> None:
        for end in (self.lo, self.hi):
            if end is not None and end.tzinfo is None:
                raise ValueError("Bounds need timezone-aware datetimes")

    def contains(self, t: datetime) -> bool:
        if self.lo is not None and (t < self.lo or (t == self.lo and not self.lo_inclusive)):
            return False
        return not (self.hi is not None and (t > self.hi or (t == self.hi and not self.hi_inclusive)))


def clinical_time(record: Record) -> datetime | None:
    """The time a ``when`` filter applies to: encounter and appointment start, result effective time."""
    if isinstance(record, Result):
        return record.effective_at
    if isinstance(record, Encounter | Appointment):
        return record.start_at
    return None


_OWNER = operator.attrgetter("patient_source_id")
# Time indexes sort on the time alone: a bisect for ``(t,)`` needs nothing more, and one datetime
# comparison per step instead of a tuple's two halves the sort at build.
_TIME = operator.itemgetter(0)
_TIME_ATTR: dict[Kind, str] = {
    "encounters": "start_at",
    "results": "effective_at",
    "appointments": "start_at",
}


class _Table:
    """All versions of one (kind, surface), with the indexes queries use.

    Writes only append the version (``pending``); ``refresh`` folds pending versions into the
    indexes and sorts them, once, before the next read.
    """

    __slots__ = (
        "by_identifier",
        "by_patient",
        "by_time",
        "by_updated",
        "ids",
        "kind",
        "pending",
        "versions",
    )

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.versions: dict[str, list[Version]] = {}
        self.ids: list[str] = []
        # (time, source_id) for every clinical time / last_updated any version ever had, in time
        # order (ties in write order); a record whose time moved is found under each time, and the
        # as-of version decides whether it matches.
        self.by_time: list[tuple[datetime, str]] = []
        self.by_updated: list[tuple[datetime, str]] = []
        self.by_patient: dict[str, set[str]] = {}
        self.by_identifier: dict[tuple[str, str], set[str]] = {}
        self.pending: list[Version] = []

    def refresh(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        records = [v.record for v in pending]
        sids = [r.source_id for r in records]
        self.by_updated.extend(zip([v.last_updated for v in pending], sids, strict=True))
        if self.kind == "patients":
            for patient in records:
                assert isinstance(patient, Patient)
                for ident in patient.identifiers:
                    self.by_identifier.setdefault((ident.system, ident.value), set()).add(patient.source_id)
        else:
            self.by_time.extend(
                zip(map(operator.attrgetter(_TIME_ATTR[self.kind]), records), sids, strict=True)
            )
            by_patient = self.by_patient
            for owner, sid in zip(map(_OWNER, records), sids, strict=True):
                by_patient.setdefault(owner, set()).add(sid)
            self.by_time.sort(key=_TIME)
        self.ids.sort()
        self.by_updated.sort(key=_TIME)


def _as_of(versions: list[Version], seq: int) -> Version | None:
    # Most records have one or two versions and readers mostly ask for (nearly) the head, so walking
    # back from the end beats a bisect.
    for v in reversed(versions):
        if v.seq <= seq:
            return v
    return None


def _time_range(index: list[tuple[datetime, str]], bounds: Bounds) -> set[str]:
    """Ids with some indexed time inside ``bounds``, ends included (inclusiveness is checked later)."""
    start = 0 if bounds.lo is None else bisect.bisect_left(index, (bounds.lo,))
    stop = len(index) if bounds.hi is None else bisect.bisect_left(index, (bounds.hi + _ONE_US,))
    return {sid for _, sid in index[start:stop]}


class Store:
    """Every version of every sandbox record, with snapshot reads.

    ``cache`` is free for renderers to memoize serialized bodies: key it by
    ``(kind, surface, source_id, version_id, <renderer variant>...)``. Versions never change, so an
    entry never goes stale; the store never reads or evicts it.

    Thread-safe: one lock serializes writes and query evaluation (a starlette app may advance the
    world in a worker thread while the event loop serves searches).
    """

    def __init__(self, clock: datetime) -> None:
        if clock.tzinfo is None:
            raise ValueError("the store clock must be timezone-aware")
        self.clock: datetime = clock
        self.head_seq: int = 0
        self.cache: dict[tuple[Hashable, ...], bytes] = {}
        self._tables: dict[tuple[str, str], _Table] = {}
        self._log: list[Version] = []
        self._queries: OrderedDict[Hashable, tuple[list[Version], list[str]]] = OrderedDict()
        self._lock = threading.RLock()

    # -- writes ---------------------------------------------------------------------------------

    def put(self, kind: Kind, record: Record, *, at: datetime | None = None) -> Version:
        """Store a new version of ``record``: ``seq = head_seq + 1``, ``version_id`` one more than
        the record's previous version, ``last_updated = at or clock`` -- moved 1 ms past the previous
        version's when it would not be later. ``at`` lets the generator backdate what it builds."""
        if _KIND_OF.get(type(record)) != kind:
            raise ValueError(f"a {type(record).__name__} record cannot be stored as {kind!r}")
        stamp = self.clock if at is None else at
        if stamp.tzinfo is None:
            raise ValueError("last_updated must be timezone-aware")
        with self._lock:
            table = self._tables.get((kind, record.surface))
            if table is None:
                table = self._tables[(kind, record.surface)] = _Table(kind)
            sid = record.source_id
            history = table.versions.get(sid)
            if history is None:
                history = table.versions[sid] = []
                table.ids.append(sid)
                version_id = 1
            else:
                previous = history[-1]
                version_id = previous.version_id + 1
                if stamp <= previous.last_updated:
                    stamp = previous.last_updated + _ONE_MS
            seq = self.head_seq = self.head_seq + 1
            version = Version(kind, record, seq, stamp, version_id)
            history.append(version)
            self._log.append(version)
            table.pending.append(version)
            return version

    def put_new(self, kind: Kind, records: list[Record], stamps: list[datetime]) -> None:
        """Store version 1 of each of ``records`` at ``stamps[i]``, in order: the same versions and
        seqs as ``put`` called once per record, for records the store has never seen (a bulk build).
        One lock and one pass instead of a call per record, which is most of a large world's start."""
        cls = next(c for c, k in _KIND_OF.items() if k == kind)
        if any(type(r) is not cls for r in records):
            raise ValueError(f"only {cls.__name__} records can be stored as {kind!r}")
        if len(records) != len(stamps):
            raise ValueError("put_new needs one stamp per record")
        if any(s.tzinfo is None for s in stamps):
            raise ValueError("last_updated must be timezone-aware")
        with self._lock:
            first = self.head_seq + 1
            new = [
                _NEW_VERSION(kind, r, seq, s, 1)
                for seq, r, s in zip(range(first, first + len(records)), records, stamps, strict=True)
            ]
            surfaces = [r.surface for r in records]
            batches: list[tuple[_Table, list[str], list[Version]]] = []
            for surface in dict.fromkeys(surfaces):
                table = self._tables.get((kind, surface))
                if table is None:
                    table = self._tables[(kind, surface)] = _Table(kind)
                mine = [s == surface for s in surfaces]
                ids = [r.source_id for r in itertools.compress(records, mine)]
                # Checked before anything is written, so a refused batch leaves the store as it was.
                if len(set(ids)) != len(ids) or not table.versions.keys().isdisjoint(ids):
                    raise ValueError(f"put_new takes only new {kind} records, each once")
                batches.append((table, ids, list(itertools.compress(new, mine))))
            for table, ids, versions in batches:
                table.versions.update(zip(ids, ([v] for v in versions), strict=True))
                table.ids.extend(ids)
                table.pending.extend(versions)
            self._log.extend(new)
            self.head_seq += len(new)

    def refresh(self) -> None:
        """Fold every pending write into the indexes now (a server calls this before it listens, so
        the first request does not pay for a bulk load)."""
        with self._lock:
            for table in self._tables.values():
                table.refresh()

    # -- reads ----------------------------------------------------------------------------------

    def current(
        self, kind: Kind, surface: Surface, source_id: str, *, as_of_seq: int | None = None
    ) -> Version | None:
        """The record's newest version with ``seq <= as_of_seq`` (default: the head), or None."""
        table = self._tables.get((kind, surface))
        if table is None:
            return None
        history = table.versions.get(source_id)
        if not history:
            return None
        return _as_of(history, self.head_seq if as_of_seq is None else as_of_seq)

    def history(self, kind: Kind, surface: Surface, source_id: str) -> list[Version]:
        """Every version of one record, oldest first (FHIR ``_history``)."""
        table = self._tables.get((kind, surface))
        if table is None:
            return []
        return list(table.versions.get(source_id, ()))

    def log(self, *, after_seq: int = 0, upto_seq: int | None = None) -> list[Version]:
        """Every version written with ``after_seq < seq <= upto_seq``, in write order."""
        # seq n is at index n - 1.
        return self._log[after_seq : self.head_seq if upto_seq is None else upto_seq]

    def count(self, kind: Kind, surface: Surface) -> int:
        """How many distinct records of (kind, surface) exist at the head."""
        table = self._tables.get((kind, surface))
        return 0 if table is None else len(table.versions)

    def query(
        self,
        kind: Kind,
        surface: Surface,
        *,
        as_of_seq: int | None = None,
        source_ids: Collection[str] | None = None,
        patient_ids: Collection[str] | None = None,
        when: Bounds | None = None,
        updated: Bounds | None = None,
        identifier: tuple[str, str] | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[Version]:
        """The current version, as of ``as_of_seq`` (default: head), of each matching record,
        sorted by source_id.

        Filters combine with AND: ``source_ids``; ``patient_ids`` (the owning patient; for
        ``patients``, the patient's own id); ``when`` on the clinical time (encounter and appointment
        ``start_at``, result ``effective_at``; an error for patients); ``updated`` on
        ``last_updated``; ``identifier`` as (system, value), patients only. ``after`` and ``limit``
        page through the answer: records with ``source_id > after``, at most ``limit`` of them.
        A page of a search pinned to one ``as_of_seq`` is a bisect into a cached answer.
        """
        if when is not None and kind == "patients":
            raise ValueError("patients have no clinical time to filter on")
        if identifier is not None and kind != "patients":
            raise ValueError("only patients have identifiers")
        with self._lock:
            seq = self.head_seq if as_of_seq is None else min(as_of_seq, self.head_seq)
            key = (
                kind,
                surface,
                seq,
                None if source_ids is None else frozenset(source_ids),
                None if patient_ids is None else frozenset(patient_ids),
                when,
                updated,
                identifier,
            )
            answer = self._queries.get(key)
            if answer is None:
                versions = self._evaluate(kind, surface, seq, key[3], key[4], when, updated, identifier)
                answer = (versions, [v.record.source_id for v in versions])
                self._queries[key] = answer
                if len(self._queries) > _QUERY_CACHE_SIZE:
                    self._queries.popitem(last=False)
            else:
                self._queries.move_to_end(key)
        versions, ids = answer
        start = 0 if after is None else bisect.bisect_right(ids, after)
        stop = len(ids) if limit is None else min(len(ids), start + limit)
        if start == 0 and stop == len(ids):
            return list(versions)
        return versions[start:stop]

    def _evaluate(
        self,
        kind: Kind,
        surface: Surface,
        seq: int,
        source_ids: frozenset[str] | None,
        patient_ids: frozenset[str] | None,
        when: Bounds | None,
        updated: Bounds | None,
        identifier: tuple[str, str] | None,
    ) -> list[Version]:
        table = self._tables.get((kind, surface))
        if table is None:
            return []
        table.refresh()
        candidates: set[str] | None = None
        if source_ids is not None:
            candidates = {sid for sid in source_ids if sid in table.versions}
        if patient_ids is not None:
            if kind == "patients":
                owned = {pid for pid in patient_ids if pid in table.versions}
            else:
                owned = set()
                for pid in patient_ids:
                    owned.update(table.by_patient.get(pid, ()))
            candidates = owned if candidates is None else candidates & owned
        if identifier is not None:
            known = table.by_identifier.get(identifier, set())
            candidates = set(known) if candidates is None else candidates & known
        if when is not None and (candidates is None or len(candidates) > _SMALL):
            in_window = _time_range(table.by_time, when)
            candidates = in_window if candidates is None else candidates & in_window
        if updated is not None and (candidates is None or len(candidates) > _SMALL):
            touched = _time_range(table.by_updated, updated)
            candidates = touched if candidates is None else candidates & touched
        ordered = table.ids if candidates is None else sorted(candidates)

        out: list[Version] = []
        versions = table.versions
        for sid in ordered:
            history = versions[sid]
            version = history[-1]
            if version.seq > seq:
                found = _as_of(history, seq)
                if found is None:
                    continue
                version = found
            record = version.record
            if (
                patient_ids is not None and kind != "patients" and record.patient_source_id not in patient_ids  # type: ignore[union-attr]
            ):
                continue
            if identifier is not None and not any(
                (i.system, i.value) == identifier
                for i in record.identifiers  # type: ignore[union-attr]
            ):
                continue
            if when is not None:
                t = clinical_time(record)
                if t is None or not when.contains(t):
                    continue
            if updated is not None and not updated.contains(version.last_updated):
                continue
            out.append(version)
        return out
