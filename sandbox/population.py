"""The sandbox's synthetic world: persons, their records on two EHR surfaces, and the ground truth.

A seeded generator makes a population of ``Person`` s (the truth), gives each a ``Patient`` record on
the FHIR surface, the Data Model surface or both (with realistic demographic noise between the two
copies), fills both EHRs with encounters, lab results and appointments, and writes every record to a
``Store``. ``World.advance`` then moves the sandbox clock and lets things happen: new patients and
visits, reschedules, cancellations, corrected results, records entered in error.

Invariants:
- determinism: the same ``PopulationConfig`` (after defaults are resolved) gives the same world,
  record for record and byte for byte, and the same sequence of ``advance`` calls gives the same
  changes. Every draw comes from a ``random.Random`` seeded from the config; nothing reads the global
  random state, the wall clock (except to default ``end`` to today) or ``uuid4``;
- one ``Patient`` per person per surface; ``person_id`` is the only link between copies, and it is
  never served;
- identifiers are unique per system across persons (an identifier value may repeat in another system
  -- deliberately, as decoys); the enterprise identifier is the same value on both surfaces;
- every datetime is aware UTC at whole seconds; clinical times are drawn in the FHIR EHR's local
  zone (clinic hours look like clinic hours there) and stored in UTC;
- ``World.truth()`` mirrors the unified warehouse schema's column names and dtypes, without
  importing the pipeline (the sandbox stands in for a remote system).

Build timestamps: each record's first ``last_updated`` is backdated to when it would plausibly have
been written (a visit's end plus a little, a result's collection plus hours, a booking weeks before
its slot), never later than the start clock. ``advance`` writes at event times inside
(old clock, new clock].
"""

import contextlib
import dataclasses
import gc
import heapq
import itertools
import math
import operator
import random
import threading
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

import polars as pl
import pyarrow as pa

from sandbox import names
from sandbox.model import (
    Appointment,
    Encounter,
    Identifier,
    Kind,
    Patient,
    Person,
    Record,
    Result,
    Surface,
    bulk_constructor,
)
from sandbox.store import Store

# -- identifier systems ---------------------------------------------------------------------------

FHIR_MRN: Final = "urn:redox:fhir-ehr:MR"
DM_MRN: Final = "urn:redox:dm:MR"
DM_EHRID: Final = "urn:redox:dm:EHRID"
ENTERPRISE_OID: Final = "2.16.840.1.113883.3.4242.1"
ENTERPRISE: Final = f"urn:oid:{ENTERPRISE_OID}"
SURFACES: Final[tuple[Surface, Surface]] = ("fhir", "datamodel")

# -- population shape -----------------------------------------------------------------------------

P_BOTH: Final = 0.60
P_FHIR_ONLY: Final = 0.20  # the rest (0.20) are on the Data Model surface only
P_ENTERPRISE: Final = 0.50  # of persons on both surfaces
HARD_RATE: Final = 0.025  # share of persons in a hard non-match group
HARD_GROUPS: Final = ("twin", "same-name-dob", "household")
_HARD_WEIGHTS: Final = (0.40, 0.25, 0.35)
_HOUSEHOLD_OF_THREE: Final = 0.4

# Noise kinds in the order they are applied to a copy (a married name is typo'd, not the reverse).
NOISE_KINDS: Final = (
    "hyphenated",
    "married-name",
    "nickname",
    "typo",
    "name-swap",
    "dob-swap",
    "missing-ssn",
    "ssn-digit",
    "moved",
    "missing-phone",
    "missing-email",
)
_NOISE_WEIGHTS: Final[dict[str, float]] = {
    # Relative weights among the kinds a person is eligible for (a hyphenated-name variant needs a
    # compound name, a married name an adult woman, a day/month swap a day <= 12), so rarely
    # eligible kinds weigh more to show up at all in a small world.
    "hyphenated": 25,
    "married-name": 12,
    "nickname": 12,
    "typo": 15,
    "name-swap": 4,
    "dob-swap": 10,
    "missing-ssn": 9,
    "ssn-digit": 5,
    "moved": 12,
    "missing-phone": 9,
    "missing-email": 9,
}
# How many kinds a copy pair without a shared enterprise id gets: mostly 0-2.
_NOISE_COUNTS: Final = ((0, 0.30), (1, 0.45), (2, 0.20), (3, 0.05))
# Enterprise-linked pairs still drift a little (people move), but the link does not depend on it.
_P_LINKED_NOISE: Final = 0.15
_LINKED_KINDS: Final = ("moved", "missing-phone", "missing-email", "typo")
_P_DECOY: Final = 0.005  # of Data Model patients whose MRN value is some other person's FHIR MRN

# -- clinical rates, per surface patient per 90 days ----------------------------------------------

ENCOUNTERS_PER_90D: Final = 3.0
ORDERS_PER_90D: Final = 1.5  # lab orders; a panel averages ~5 results, so ~8 results per 90 days
APPOINTMENTS_PER_90D: Final = 3.0
FUTURE_DAYS: Final = 30  # booked appointments reach this far past the clock
_CLASS_WEIGHTS: Final = {"ambulatory": 65, "emergency": 10, "inpatient": 7, "observation": 5, "virtual": 13}
_DURATIONS: Final = (15, 20, 30, 45, 60)
_DURATION_WEIGHTS: Final = (2, 2, 4, 1, 1)

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

_DAY = 86_400
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()
_LETTERS: Final = "abcdefghijklmnopqrstuvwxyz"

# Unique-id spaces: a keyed bijection on [0, n) (see _Perm) turns a running counter into ids that are
# collision-free and look random, with no set of used ids to keep.
_MRN_SPACE: Final = 90_000_000  # 8-digit MRNs: FHIR takes even slots, Data Model odd ones
_VISIT_SPACE: Final = 900_000_000  # 9-digit VisitNumbers: encounters even, appointments odd
_ORDER_SPACE: Final = 900_000_000
_ENTERPRISE_SPACE: Final = 9_000_000_000
_SSN_SPACE: Final = 100 * 99 * 9999  # area 900-999, group 01-99, serial 0001-9999
_NPI_SPACE: Final = 900_000_000


_MIX: Final = 0x9E3779B1  # odd, golden-ratio multiplier: multiply mod 2**32, keep the high bits


@dataclasses.dataclass(frozen=True)
class _Perm:
    """A keyed pseudo-random bijection on [0, n): a four-round Feistel network on the smallest even
    number of bits that covers n, with values that land at or above n walked again until they fall
    inside (format-preserving encryption's cycle walking). Unlike an affine map, consecutive
    counters give unrelated ids, so ids leak neither order nor which copies were made together."""

    n: int
    half: int
    keys: tuple[int, ...]

    def _once(self, x: int) -> int:
        h = self.half
        left, right = x >> h, x & ((1 << h) - 1)
        for k in self.keys:
            left, right = right, left ^ ((((right + k) * _MIX) & 0xFFFFFFFF) >> (32 - h))
        return (left << h) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise ValueError("identifier space exhausted")
        x = self._once(i)
        while x >= self.n:
            x = self._once(x)
        return x

    def _once_series(self, x: pl.Series) -> pl.Series:
        h = self.half
        left, right = x // (1 << h), x % (1 << h)
        for k in self.keys:
            left, right = right, left ^ ((((right + k) * _MIX) % (1 << 32)) // (1 << (32 - h)))
        return left * (1 << h) + right

    def series(self, i: pl.Series) -> pl.Series:
        x = self._once_series(i.cast(pl.Int64))
        while True:
            outside = x >= self.n
            if not outside.any():
                return x
            x = pl.select(
                pl.when(pl.lit(outside)).then(pl.lit(self._once_series(x))).otherwise(pl.lit(x))
            ).to_series()


def _perm(rng: random.Random, n: int) -> _Perm:
    bits = max(2, (n - 1).bit_length())
    half = (bits + 1) // 2
    return _Perm(n, half, tuple(rng.getrandbits(half) for _ in range(4)))


@dataclasses.dataclass(frozen=True)
class _Ids:
    """The id maps of one seed; shared by build, advance and the fast frame path."""

    mrn: _Perm
    visit: _Perm
    order: dict[str, _Perm]
    enterprise: _Perm
    ssn: _Perm
    npi: _Perm

    @classmethod
    def of(cls, seed: int) -> "_Ids":
        rng = random.Random(f"redox-sandbox:{seed}:ids")
        return cls(
            mrn=_perm(rng, _MRN_SPACE),
            visit=_perm(rng, _VISIT_SPACE),
            order={"fhir": _perm(rng, _ORDER_SPACE), "datamodel": _perm(rng, _ORDER_SPACE)},
            enterprise=_perm(rng, _ENTERPRISE_SPACE),
            ssn=_perm(rng, _SSN_SPACE),
            npi=_perm(rng, _NPI_SPACE),
        )


# -- vector draws ---------------------------------------------------------------------------------


class _Vec:
    """Vectors of draws from a ``random.Random`` (no numpy here): ``getrandbits`` fills a buffer that
    Arrow reads as an array, so a million draws cost one call."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def _words(self, n: int, width: int, dtype: pa.DataType) -> pl.Series:
        if n == 0:
            return pl.from_arrow(pa.array([], type=dtype))  # type: ignore[return-value]
        raw = self.rng.getrandbits(8 * width * n).to_bytes(width * n, "little")
        array = pa.Array.from_buffers(dtype, n, [None, pa.py_buffer(raw)])
        return pl.from_arrow(array)  # type: ignore[return-value]

    def u(self, n: int) -> pl.Series:
        """Uniform floats in [0, 1)."""
        return self._words(n, 4, pa.uint32()).cast(pl.Float64) / 4294967296.0

    def ints(self, n: int, lo: int, hi: int) -> pl.Series:
        """Uniform integers in [lo, hi)."""
        return (self.u(n) * (hi - lo)).floor().cast(pl.Int64) + lo

    def weighted(self, n: int, weights: Sequence[float]) -> pl.Series:
        """Indexes into ``weights``, drawn in proportion to them."""
        cum = [float(c) for c in itertools.accumulate(weights)]
        idx = pl.Series(cum, dtype=pl.Float64).search_sorted(self.u(n) * cum[-1], side="right")
        return idx.clip(0, len(weights) - 1).cast(pl.Int64)

    def uuids(self, n: int) -> pl.Series:
        """Random (version 4 layout) UUID strings."""
        hexes = self._words(n, 16, pa.binary(16)).bin.encode("hex")
        variant = pl.Series(list("89ab")).gather(self.ints(n, 0, 4))
        frame = pl.DataFrame({"h": hexes, "v": variant})
        h = pl.col("h").str
        return frame.select(
            pl.concat_str(
                [
                    h.slice(0, 8),
                    pl.lit("-"),
                    h.slice(8, 4),
                    pl.lit("-4"),
                    h.slice(13, 3),
                    pl.lit("-"),
                    pl.col("v"),
                    h.slice(17, 3),
                    pl.lit("-"),
                    h.slice(20, 12),
                ]
            )
        ).to_series()


def _zipf(n: int, flatten: float) -> list[float]:
    """Popularity weights for a list ordered most common first."""
    return [1.0 / (rank + flatten) for rank in range(n)]


_ANALYTES: Final[dict[str, names.Analyte]] = {
    a[0]: a  # type: ignore[misc]
    for panel in names.PANELS.values()
    for a in panel
    if len(a) == 10
}


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _uniq(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


_MALE: Final = _uniq(names.MALE_GIVEN)
_FEMALE: Final = _uniq(names.FEMALE_GIVEN)
_FAMILY: Final = _uniq(names.FAMILY)
_SIMPLE_FAMILY: Final = tuple(f for f in _FAMILY if f.isalpha())
_MALE_SET: Final = frozenset(_MALE)


def _fmt_ssn(q: int) -> str:
    area, rest = divmod(q, 99 * 9999)
    group, serial = divmod(rest, 9999)
    return f"{900 + area:03d}-{group + 1:02d}-{serial + 1:04d}"


def _new_address(rng: random.Random) -> tuple[str, str, str, str]:
    city, state, zip3, _ = rng.choice(names.CITIES)
    line = f"{rng.randint(1, 9999)} {rng.choice(names.STREET_NAMES)} {rng.choice(names.STREET_SUFFIXES)}"
    if rng.random() < 0.12:
        line += f" Apt {rng.randint(1, 40)}"
    return line, city, state, f"{zip3}{rng.randrange(100):02d}"


# -- persons and their patient copies (vectorized) ------------------------------------------------


@dataclasses.dataclass
class _Batch:
    persons: pl.DataFrame  # person_id, canonical demographics, hard_group, group_id, on_fhir, on_dm
    patients: pl.DataFrame  # unified patient columns + sex_source, person_id, noise
    fhir_count: int
    dm_count: int


_DEMOGRAPHICS: Final = (
    "given_name",
    "middle_name",
    "family_name",
    "birth_date",
    "sex",
    "ssn",
    "address_line",
    "address_city",
    "address_state",
    "address_postal_code",
    "phone",
    "email",
)


def _canonical(v: _Vec, ids: _Ids, first_person: int, m: int, today: date) -> pl.DataFrame:
    """Persons' true demographics, before hard groups are carved out of them."""
    u_sex = v.u(m)
    sex = (
        pl.when(u_sex < 0.497)
        .then(pl.lit("female"))
        .when(u_sex < 0.994)
        .then(pl.lit("male"))
        .when(u_sex < 0.998)
        .then(pl.lit("other"))
        .otherwise(pl.lit("unknown"))
    )
    male, female = pl.Series(_MALE), pl.Series(_FEMALE)
    given_m = male.gather(v.weighted(m, _zipf(len(_MALE), 8)))
    given_f = female.gather(v.weighted(m, _zipf(len(_FEMALE), 8)))
    middle_m = male.gather(v.weighted(m, _zipf(len(_MALE), 20)))
    middle_f = female.gather(v.weighted(m, _zipf(len(_FEMALE), 20)))
    family_w = _zipf(len(_FAMILY), 15)
    family_a = pl.Series(_FAMILY).gather(v.weighted(m, family_w))
    family_b = pl.Series(_SIMPLE_FAMILY).gather(v.weighted(m, _zipf(len(_SIMPLE_FAMILY), 15)))
    # Age: a broad adult bulk plus children, in days so that birthdays fall on every date.
    age_days = (v.u(m).pow(1.15) * 92 * 365.25).cast(pl.Int64)
    street = pl.Series(names.STREET_NAMES).gather(v.weighted(m, _zipf(len(names.STREET_NAMES), 30)))
    suffix = pl.Series(names.STREET_SUFFIXES).gather(v.weighted(m, _zipf(len(names.STREET_SUFFIXES), 2)))
    city_idx = v.weighted(m, _zipf(len(names.CITIES), 25))
    cities = pl.DataFrame(
        {
            "city": [c[0] for c in names.CITIES],
            "state": [c[1] for c in names.CITIES],
            "zip3": [c[2] for c in names.CITIES],
            "area": [c[3] for c in names.CITIES],
        }
    )[city_idx]
    domain = pl.Series(names.EMAIL_DOMAINS).gather(v.ints(m, 0, len(names.EMAIL_DOMAINS)))
    email_sep = pl.Series([".", "_", ""]).gather(v.weighted(m, (5, 2, 3)))
    index = pl.int_range(first_person, first_person + m, eager=True, dtype=pl.Int64)
    frame = pl.DataFrame(
        {
            "index": index,
            "u_sex": u_sex,
            "given_m": given_m,
            "given_f": given_f,
            "middle_m": middle_m,
            "middle_f": middle_f,
            "has_middle": v.u(m) < 0.65,
            "family_a": family_a,
            "family_b": family_b,
            "hyphen": v.u(m) < 0.08,
            "age_days": age_days,
            "has_ssn": v.u(m) < 0.9,
            "ssn_q": ids.ssn.series(index),
            "number": v.ints(m, 1, 10000),
            "street": street,
            "suffix": suffix,
            "apt": v.u(m) < 0.12,
            "apt_no": v.ints(m, 1, 41),
            "city": cities["city"],
            "state": cities["state"],
            "zip": cities["zip3"] + v.ints(m, 0, 100).cast(pl.String).str.zfill(2),
            "area": cities["area"],
            "has_phone": v.u(m) < 0.92,
            "exchange": v.ints(m, 200, 1000),
            "line": v.ints(m, 0, 10000),
            "has_email": v.u(m) < 0.72,
            "email_sep": email_sep,
            "email_no": v.ints(m, 0, 100),
            "email_has_no": v.u(m) < 0.45,
            "domain": domain,
        }
    )
    female_like = pl.col("u_sex") < 0.497
    # Others get a name from either list, by the low bit of where they fell in the draw.
    female_like = female_like | (
        (pl.col("u_sex") >= 0.994) & ((pl.col("u_sex") * 1e6).cast(pl.Int64) % 2 == 0)
    )
    frame = frame.with_columns(
        person_id=pl.format("P{}", pl.col("index").cast(pl.String).str.zfill(8)),
        sex=sex,
        given_name=pl.when(female_like).then("given_f").otherwise("given_m"),
        middle_name=pl.when(pl.col("has_middle")).then(
            pl.when(female_like).then("middle_f").otherwise("middle_m")
        ),
        family_name=pl.when(pl.col("hyphen") & (pl.col("family_a") != pl.col("family_b")))
        .then(pl.format("{}-{}", "family_a", "family_b"))
        .otherwise("family_a"),
        birth_date=pl.lit(today) - pl.duration(days=pl.col("age_days")),
        address_line=pl.concat_str(
            [
                pl.col("number").cast(pl.String),
                pl.lit(" "),
                "street",
                pl.lit(" "),
                "suffix",
                pl.when("apt").then(pl.format(" Apt {}", "apt_no")).otherwise(pl.lit("")),
            ]
        ),
        address_city="city",
        address_state="state",
        address_postal_code="zip",
        phone=pl.when("has_phone").then(
            pl.format("+1{}{}{}", "area", "exchange", pl.col("line").cast(pl.String).str.zfill(4))
        ),
    )
    # SSNs: children (under 1) often have none yet; everyone else mostly does.
    ssn_digits = pl.col("ssn_q")
    area = ssn_digits // (99 * 9999)
    group = (ssn_digits // 9999) % 99 + 1
    serial = ssn_digits % 9999 + 1
    handle = pl.col("family_name").str.to_lowercase().str.replace_all(r"[^a-z]", "")
    frame = frame.with_columns(
        ssn=pl.when(pl.col("has_ssn") & (pl.col("age_days") > 365)).then(
            pl.format(
                "{}-{}-{}",
                (area + 900).cast(pl.String),
                group.cast(pl.String).str.zfill(2),
                serial.cast(pl.String).str.zfill(4),
            )
        ),
        email=pl.when("has_email").then(
            pl.concat_str(
                [
                    pl.col("given_name").str.to_lowercase().str.replace_all(r"[^a-z]", ""),
                    "email_sep",
                    handle,
                    pl.when("email_has_no").then(pl.col("email_no").cast(pl.String)).otherwise(pl.lit("")),
                    pl.lit("@"),
                    "domain",
                ]
            )
        ),
    )
    return frame.select("index", "person_id", *_DEMOGRAPHICS)


def _carve_hard_groups(
    rng: random.Random, frame: pl.DataFrame, first_person: int, today: date
) -> pl.DataFrame:
    """Turn a few runs of consecutive persons into twins, same-name-and-birth-date strangers and
    households: distinct people that a careless matcher would merge."""
    m = frame.height
    expected = m * HARD_RATE / 2.3
    groups = int(expected) + (rng.random() < expected - int(expected))
    slots = m // 3
    groups = min(groups, slots)
    hard: list[str | None] = [None] * m
    group_id: list[str | None] = [None] * m
    if groups == 0:
        return frame.with_columns(
            hard_group=pl.Series(hard, dtype=pl.String), group_id=pl.Series(group_id, dtype=pl.String)
        )
    anchors = sorted(3 * s for s in rng.sample(range(slots), groups))
    src = {field: list(range(m)) for field in ("family", "dob", "address", "phone", "given", "sex")}
    cols = {f: frame[f].to_list() for f in ("given_name", "middle_name", "sex", "birth_date", "phone")}
    dob_fix: dict[int, date] = {}
    given_fix: dict[int, str] = {}
    middle_fix: dict[int, str | None] = {}
    for n, a in enumerate(anchors):
        # Every kind of group exists whenever there is room for three, however the dice fall.
        kind = HARD_GROUPS[n] if n < len(HARD_GROUPS) else rng.choices(HARD_GROUPS, _HARD_WEIGHTS)[0]
        members = [a, a + 1]
        if kind == "household" and rng.random() < _HOUSEHOLD_OF_THREE:
            members.append(a + 2)
        gid = f"G{first_person + a:08d}"
        for r in members:
            hard[r] = kind
            group_id[r] = gid
        for r in members[1:]:
            if kind == "twin":
                for field in ("family", "dob", "address", "phone"):
                    src[field][r] = a
                if cols["given_name"][r] == cols["given_name"][a]:
                    pool = _FEMALE if cols["sex"][r] == "female" else _MALE
                    given_fix[r] = pool[(pool.index(cols["given_name"][a]) + 1) % len(pool)]
            elif kind == "same-name-dob":
                for field in ("family", "dob", "given", "sex"):
                    src[field][r] = a
            else:
                for field in ("family", "address"):
                    src[field][r] = a
                if rng.random() < 0.7:
                    src["phone"][r] = a
                # Parent and child: a generation apart, whichever way fits before today.
                gap = timedelta(days=rng.randint(20 * 365, 40 * 365))
                anchor_dob: date = cols["birth_date"][a]
                dob_fix[r] = anchor_dob + gap if anchor_dob + gap < today else anchor_dob - gap
                if r == a + 1 and cols["sex"][a] == "male" and rng.random() < 0.3:
                    # A junior: same given (and often middle) name, same address, different birth date.
                    src["sex"][r] = a
                    src["given"][r] = a
                    middle_fix[r] = cols["middle_name"][a]
    g = {k: pl.Series(v, dtype=pl.Int64) for k, v in src.items()}
    out = frame.with_columns(
        family_name=frame["family_name"].gather(g["family"]),
        birth_date=frame["birth_date"].gather(g["dob"]),
        address_line=frame["address_line"].gather(g["address"]),
        address_city=frame["address_city"].gather(g["address"]),
        address_state=frame["address_state"].gather(g["address"]),
        address_postal_code=frame["address_postal_code"].gather(g["address"]),
        phone=frame["phone"].gather(g["phone"]),
        given_name=frame["given_name"].gather(g["given"]),
        sex=frame["sex"].gather(g["sex"]),
        hard_group=pl.Series(hard, dtype=pl.String),
        group_id=pl.Series(group_id, dtype=pl.String),
    )
    for column, fixes in (("birth_date", dob_fix), ("given_name", given_fix), ("middle_name", middle_fix)):
        if fixes:
            series = out[column].clone()
            series.scatter(list(fixes), list(fixes.values()))
            out = out.with_columns(series)
    return out


def _typo(rng: random.Random, s: str) -> str:
    """One keyboard slip, never on the first letter (clerks rarely get that wrong)."""
    if len(s) < 3:
        return s + rng.choice(_LETTERS)
    i = rng.randrange(1, len(s))
    op = rng.random()
    if op < 0.25 and s[i - 1] != s[i]:
        return s[: i - 1] + s[i] + s[i - 1] + s[i + 1 :]
    if op < 0.5 and len(s) > 3:
        return s[:i] + s[i + 1 :]
    if op < 0.7:
        return s[:i] + rng.choice(_LETTERS) + s[i:]
    choices = _LETTERS.replace(s[i].lower(), "")
    return s[:i] + rng.choice(choices) + s[i + 1 :]


def _eligible(kind: str, c: dict[str, object], today: date) -> bool:
    family = c["family_name"]
    assert isinstance(family, str)
    if kind == "nickname":
        return c["given_name"] in names.NICKNAMES
    if kind == "dob-swap":
        b = c["birth_date"]
        assert isinstance(b, date)
        return b.day <= 12 and b.day != b.month
    if kind in ("missing-ssn", "ssn-digit"):
        return c["ssn"] is not None
    if kind == "married-name":
        b = c["birth_date"]
        assert isinstance(b, date)
        return c["sex"] == "female" and (today - b).days > 20 * 365 and "-" not in family
    if kind == "hyphenated":
        return "-" in family or " " in family
    if kind == "missing-phone":
        return c["phone"] is not None
    if kind == "missing-email":
        return c["email"] is not None
    return True


def _apply_noise(rng: random.Random, kind: str, copy: dict[str, object]) -> bool:
    """Apply one noise kind to a patient copy in place; False when it does not apply to this copy."""
    if kind == "hyphenated":
        family = str(copy["family_name"])
        parts = family.replace("-", " ").split()
        roll = rng.random()
        if "-" in family:
            copy["family_name"] = parts[0] if roll < 0.6 else (parts[-1] if roll < 0.8 else " ".join(parts))
        else:
            copy["family_name"] = "".join(parts) if roll < 0.6 else parts[-1]
    elif kind == "married-name":
        new = rng.choice(_SIMPLE_FAMILY)
        copy["family_name"] = f"{copy['family_name']}-{new}" if rng.random() < 0.5 else new
    elif kind == "nickname":
        given = copy["given_name"]
        if given not in names.NICKNAMES:
            return False
        copy["given_name"] = rng.choice(names.NICKNAMES[str(given)])
    elif kind == "typo":
        field = "family_name" if rng.random() < 0.5 else "given_name"
        copy[field] = _typo(rng, str(copy[field]))
    elif kind == "name-swap":
        copy["given_name"], copy["family_name"] = copy["family_name"], copy["given_name"]
    elif kind == "dob-swap":
        b = copy["birth_date"]
        assert isinstance(b, date)
        copy["birth_date"] = date(b.year, b.day, b.month)
    elif kind == "missing-ssn":
        if copy["ssn"] is None:
            return False
        copy["ssn"] = None
    elif kind == "ssn-digit":
        ssn = copy["ssn"]
        if ssn is None:
            return False
        chars = list(str(ssn))
        # Keep the 9xx area so the value stays in the never-issued range.
        pos = rng.choice((4, 5, 7, 8, 9, 10))
        chars[pos] = rng.choice("0123456789".replace(chars[pos], ""))
        copy["ssn"] = "".join(chars)
    elif kind == "moved":
        line, city, state, postal = _new_address(rng)
        if rng.random() < 0.4:  # moved within town
            city, state = str(copy["address_city"]), str(copy["address_state"])
            postal = str(copy["address_postal_code"])[:3] + postal[3:]
        copy["address_line"], copy["address_city"] = line, city
        copy["address_state"], copy["address_postal_code"] = state, postal
    elif kind == "missing-phone":
        if copy["phone"] is None:
            return False
        copy["phone"] = None
    elif kind == "missing-email":
        if copy["email"] is None:
            return False
        copy["email"] = None
    return True


def _draw_noise(rng: random.Random, canonical: dict[str, object], linked: bool, today: date) -> list[str]:
    if linked:
        return [rng.choice(_LINKED_KINDS)] if rng.random() < _P_LINKED_NOISE else []
    counts, weights = zip(*_NOISE_COUNTS, strict=True)
    k = rng.choices(counts, weights)[0]
    pool = [kind for kind in NOISE_KINDS if _eligible(kind, canonical, today)]
    chosen: list[str] = []
    while pool and len(chosen) < k:
        pick = rng.choices(pool, [_NOISE_WEIGHTS[p] for p in pool])[0]
        chosen.append(pick)
        pool.remove(pick)
    if "married-name" in chosen and "hyphenated" in chosen:
        chosen.remove("married-name")
    # A human must still see one person: a new name at a new address keeps birth date and SSN.
    if {"married-name", "moved"} <= set(chosen) and len(chosen) > 2:
        chosen = [c for c in chosen if c in ("married-name", "moved")]
    return sorted(chosen, key=NOISE_KINDS.index)


def _people(
    rng: random.Random,
    ids: _Ids,
    *,
    first_person: int,
    count: int,
    fhir_start: int,
    dm_start: int,
    today: date,
) -> _Batch:
    """``count`` new persons (indexes from ``first_person``) and their patient copies."""
    v = _Vec(rng)
    persons = _carve_hard_groups(rng, _canonical(v, ids, first_person, count, today), first_person, today)
    m = persons.height
    u_surface = v.u(m)
    persons = persons.with_columns(
        on_fhir=u_surface < P_BOTH + P_FHIR_ONLY,
        on_dm=(u_surface < P_BOTH) | (u_surface >= P_BOTH + P_FHIR_ONLY),
        linked=(u_surface < P_BOTH) & (v.u(m) < P_ENTERPRISE),
    ).with_columns(
        enterprise=pl.when("linked").then(
            pl.lit(ids.enterprise.series(persons["index"]).cast(pl.String).str.zfill(10))
        )
    )
    fhir = persons.filter("on_fhir")
    dm = persons.filter("on_dm")
    n_fhir, n_dm = fhir.height, dm.height

    # Noise: a Python loop, but only over persons on both surfaces (60%), with cheap string edits.
    both = persons.with_columns(
        fhir_row=pl.col("on_fhir").cast(pl.Int64).cum_sum() - 1,
        dm_row=pl.col("on_dm").cast(pl.Int64).cum_sum() - 1,
    ).filter(pl.col("on_fhir") & pl.col("on_dm"))
    overrides: dict[str, dict[str, tuple[list[int], list[object]]]] = {
        s: {f: ([], []) for f in _DEMOGRAPHICS} for s in SURFACES
    }
    noise: dict[str, dict[int, list[str]]] = {s: {} for s in SURFACES}
    for row in both.select("fhir_row", "dm_row", "linked", *_DEMOGRAPHICS).iter_rows(named=True):
        canonical: dict[str, object] = row
        kinds = _draw_noise(rng, canonical, bool(row["linked"]), today)
        if not kinds:
            continue
        copies: dict[str, dict[str, object]] = {s: dict(canonical) for s in SURFACES}
        applied: dict[str, list[str]] = {s: [] for s in SURFACES}
        for kind in kinds:
            target: str = "fhir" if rng.random() < 0.5 else "datamodel"
            if _apply_noise(rng, kind, copies[target]):
                applied[target].append(kind)
            elif _apply_noise(rng, kind, copies["datamodel" if target == "fhir" else "fhir"]):
                applied["datamodel" if target == "fhir" else "fhir"].append(kind)
        rows = {"fhir": int(row["fhir_row"]), "datamodel": int(row["dm_row"])}
        for s in SURFACES:
            if applied[s]:
                noise[s][rows[s]] = applied[s]
            for field in _DEMOGRAPHICS:
                if copies[s][field] != canonical[field]:
                    idx, vals = overrides[s][field]
                    idx.append(rows[s])
                    vals.append(copies[s][field])

    def surface_copy(frame: pl.DataFrame, surface: str) -> pl.DataFrame:
        columns = []
        for field in _DEMOGRAPHICS:
            series = frame[field]
            idx, vals = overrides[surface][field]
            if idx:
                series = series.clone()
                series.scatter(idx, vals)
            columns.append(series)
        # Built as joined strings and split once: polars converts a million tiny Python lists slowly.
        joined = pl.repeat("", frame.height, dtype=pl.String, eager=True)
        if noise[surface]:
            joined.scatter(list(noise[surface]), [",".join(k) for k in noise[surface].values()])
        as_list = (
            pl.when(joined == "").then(pl.lit([], dtype=pl.List(pl.String))).otherwise(joined.str.split(","))
        )
        return frame.select("person_id", "enterprise").with_columns(*columns, noise=as_list)

    fhir_mrn = (
        ids.mrn.series(pl.int_range(fhir_start, fhir_start + n_fhir, eager=True) * 2) + 10_000_000
    ).cast(pl.String)
    dm_mrn = (ids.mrn.series(pl.int_range(dm_start, dm_start + n_dm, eager=True) * 2 + 1) + 10_000_000).cast(
        pl.String
    )
    # Decoys: a Data Model MRN that equals another person's FHIR MRN. Unique within the Data Model
    # system still (FHIR values come from the even slots, Data Model's from the odd ones).
    decoys = int(n_dm * _P_DECOY) + (rng.random() < (n_dm * _P_DECOY) % 1)
    if decoys and n_fhir:
        dm_people, fhir_people = dm["person_id"], fhir["person_id"]
        dm_rows = rng.sample(range(n_dm), min(decoys, n_dm))
        fhir_rows = rng.sample(range(n_fhir), min(len(dm_rows), n_fhir))
        pairs = [(d, f) for d, f in zip(dm_rows, fhir_rows, strict=False) if dm_people[d] != fhir_people[f]]
        if pairs:
            dm_mrn = dm_mrn.clone()
            dm_mrn.scatter([d for d, _ in pairs], [fhir_mrn[f] for _, f in pairs])

    fhir_out = surface_copy(fhir, "fhir").with_columns(
        source_surface=pl.lit("fhir"),
        source_id=v.uuids(n_fhir),
        mrn=fhir_mrn,
        ehrid=pl.lit(None, dtype=pl.String),
    )
    dm_out = surface_copy(dm, "datamodel").with_columns(
        source_surface=pl.lit("datamodel"), source_id=dm_mrn, mrn=dm_mrn, ehrid=v.uuids(n_dm)
    )
    patients = pl.concat([fhir_out, dm_out], how="vertical")
    is_fhir = pl.col("source_surface") == "fhir"
    patients = patients.with_columns(
        identifiers=_identifier_lists(
            patients.select(
                mrn_system=pl.when(is_fhir).then(pl.lit(FHIR_MRN)).otherwise(pl.lit(DM_MRN)),
                mrn="mrn",
                ehrid="ehrid",
                enterprise="enterprise",
            )
        ),
        sex_source=pl.when(is_fhir).then("sex").otherwise(pl.col("sex").str.to_titlecase()),
    ).select(
        "source_surface",
        "source_id",
        "identifiers",
        *_DEMOGRAPHICS[:5],
        "sex_source",
        *_DEMOGRAPHICS[5:],
        "person_id",
        "noise",
    )
    return _Batch(persons=persons, patients=patients, fhir_count=n_fhir, dm_count=n_dm)


def _identifier_lists(ids: pl.DataFrame) -> pl.Series:
    """The identifiers column, List(Struct{system, value}), from per-row MRN (always), EHRID and
    enterprise id (when present). Assembled as an Arrow list array from offsets and a flat child:
    polars' concat_list over structs is two orders of magnitude slower at a million rows."""
    row = pl.int_range(pl.len(), dtype=pl.Int64)
    parts = [
        ids.select(row=row, pos=pl.lit(0), system="mrn_system", value="mrn"),
        ids.select(row=row, pos=pl.lit(1), system=pl.lit(DM_EHRID), value="ehrid"),
        ids.select(row=row, pos=pl.lit(2), system=pl.lit(ENTERPRISE), value="enterprise"),
    ]
    flat = pl.concat(parts).drop_nulls("value").sort("row", "pos")
    counts = flat.group_by("row").len().sort("row")["len"].cast(pl.Int64)
    offsets = pa.array([0, *itertools.accumulate(counts.to_list())], type=pa.int64())
    child = pa.StructArray.from_arrays(
        [flat["system"].to_arrow().cast(pa.large_string()), flat["value"].to_arrow().cast(pa.large_string())],
        names=["system", "value"],
    )
    series = pl.from_arrow(pa.LargeListArray.from_arrays(offsets, child))
    assert isinstance(series, pl.Series)
    return series.alias("identifiers")


_FRAME_SCHEMA: Final = pl.Schema(
    {
        "source_surface": pl.String(),
        "source_id": pl.String(),
        "identifiers": pl.List(pl.Struct({"system": pl.String(), "value": pl.String()})),
        "given_name": pl.String(),
        "middle_name": pl.String(),
        "family_name": pl.String(),
        "birth_date": pl.Date(),
        "sex": pl.String(),
        "sex_source": pl.String(),
        "ssn": pl.String(),
        "address_line": pl.String(),
        "address_city": pl.String(),
        "address_state": pl.String(),
        "address_postal_code": pl.String(),
        "phone": pl.String(),
        "email": pl.String(),
        "source_updated_at": pl.Datetime("us", "UTC"),
    }
)


def generate_patient_frame(n: int, seed: int) -> pl.DataFrame:
    """``n`` patient records across both surfaces, for the identity benchmark: the unified patients
    columns (schema order) plus ``person_id``, the truth. Same noise model and hard groups as the
    sandbox world; no clinical records. Rows are grouped by person (a person's copies are adjacent).
    """
    if n <= 0:
        return pl.DataFrame(schema={**_FRAME_SCHEMA, "person_id": pl.String()})
    rng = random.Random(f"redox-sandbox:{seed}:frame")
    today = date(2025, 1, 1)
    persons = math.ceil(n / (1 + P_BOTH) * 1.02) + 3
    batch = _people(rng, _Ids.of(seed), first_person=0, count=persons, fhir_start=0, dm_start=0, today=today)
    frame = batch.patients.sort("person_id", "source_surface").head(n)
    offsets = _Vec(rng).ints(frame.height, 0, 400 * _DAY)
    base = datetime(2024, 1, 1, tzinfo=UTC)
    return frame.with_columns(
        source_updated_at=pl.lit(base) + pl.duration(seconds=pl.lit(offsets)),
    ).select(*(pl.col(c).cast(t) for c, t in _FRAME_SCHEMA.items()), "person_id")


# -- clinical records (vectorized) ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PopulationConfig:
    """What the sandbox world looks like. ``end`` defaults to today (UTC), ``start`` to 90 days
    before ``end``; the world's clock starts at the end of ``end`` (midnight UTC after it)."""

    seed: int = 7
    patients: int = 1000  # number of Persons
    start: date | None = None
    end: date | None = None
    fhir_tz: str = "America/New_York"

    def resolved(self) -> "PopulationConfig":
        end = self.end or datetime.now(UTC).date()
        start = self.start or end - timedelta(days=90)
        if start > end:
            raise ValueError("PopulationConfig.start is after end")
        return dataclasses.replace(self, start=start, end=end)


def _ts(t: datetime) -> int:
    return int(t.timestamp())


def _dt(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _dts(values: list[int | None]) -> list[datetime | None]:
    # Slot-aligned times repeat a lot (a quarter-hour grid over a few months), and datetimes are
    # immutable, so records share one object per instant; the lookup runs in C (map over dict.get).
    cache: dict[int | None, datetime | None] = {x: _dt(x) for x in set(values) if x is not None}
    cache[None] = None
    return list(map(cache.__getitem__, values))


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 50:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def _poisson_vec(v: _Vec, n: int, lam: float) -> pl.Series:
    """``n`` Poisson(lam) counts by inverse CDF (one lambda for all rows)."""
    cdf, term, k = [], math.exp(-lam), 0
    total = term
    while total < 1 - 1e-12 and k < 1000:
        cdf.append(total)
        k += 1
        term *= lam / k
        total += term
    cdf.append(1.0)
    return pl.Series(cdf).search_sorted(v.u(n), side="right").cast(pl.Int64).clip(0, len(cdf) - 1)


def _repeat(owners: pl.DataFrame, counts: pl.Series) -> pl.DataFrame:
    """Each owner row repeated ``counts`` times, in order."""
    index = pl.int_range(owners.height, eager=True).repeat_by(counts).explode().drop_nulls()
    return owners[index]


_CLASSES: Final = tuple(_CLASS_WEIGHTS)
_AMBULATORY: Final = _CLASSES.index("ambulatory")
_VIRTUAL: Final = _CLASSES.index("virtual")


def _flat(options: dict[str, tuple[object, ...]]) -> tuple[list[object], list[int], list[int]]:
    """Per-class option lists flattened: values, and each class's (offset, count) by class index."""
    values: list[object] = []
    offsets, counts = [], []
    for klass in _CLASSES:
        offsets.append(len(values))
        counts.append(len(options[klass]))
        values.extend(options[klass])
    return values, offsets, counts


def _by_class(options: dict[str, tuple[object, ...]], klass: pl.Expr, u: pl.Expr) -> pl.Expr:
    """An index into ``_flat(options)[0]``: a uniform pick among the row's class's options."""
    _, offsets, counts = _flat(options)
    offset = klass.replace_strict(dict(enumerate(offsets)), return_dtype=pl.Int64)
    count = klass.replace_strict(dict(enumerate(counts)), return_dtype=pl.Int64)
    return offset + (u * count).floor().cast(pl.Int64)


def _pick(values: Sequence[object], index: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    return pl.lit(pl.Series(values, dtype=dtype)).gather(index)


def _analyte_table() -> pl.DataFrame:
    rows: list[tuple[object, ...]] = []
    for p, panel in enumerate(names.PANEL_WEIGHTS):
        for a in names.PANELS[panel]:
            if len(a) == 5:
                rows.append((p, a[0], a[1], None, 0, None, None, None, None, None, None, a[2], a[3], a[4]))
            else:
                code, display, unit, dec, low, high, c_lo, c_hi, mean, sd = a
                rows.append(
                    (p, code, display, unit, dec, low or None, high, c_lo, c_hi, mean, sd, None, None, None)
                )
    return pl.DataFrame(
        rows,
        schema={
            "panel": pl.Int64(),
            "code": pl.String(),
            "display": pl.String(),
            "unit": pl.String(),
            "decimals": pl.Int64(),
            "ref_low": pl.Float64(),
            "ref_high": pl.Float64(),
            "crit_low": pl.Float64(),
            "crit_high": pl.Float64(),
            "mean": pl.Float64(),
            "sd": pl.Float64(),
            "normal_text": pl.String(),
            "abnormal_text": pl.String(),
            "p_abnormal": pl.Float64(),
        },
        orient="row",
    ).with_columns(position=pl.int_range(pl.len()))


class _Clinic:
    """Makes clinical records in batches (polars columns, then record objects), and the identifiers
    they carry. A batch is described by its owners (surface, patient) and per-row time inputs."""

    def __init__(self, ids: _Ids, tz: ZoneInfo, seed: int) -> None:
        self.ids = ids
        self.tz = tz
        self._offsets: dict[int, int] = {}
        self.counter = {"encounters": 0, "appointments": 0, "fhir": 0, "datamodel": 0}
        prng = random.Random(f"redox-sandbox:{seed}:providers")
        self.provider_ids = [f"1{ids.npi(i):09d}" for i in range(150)]
        self.provider_names = [
            f"{prng.choice(_MALE if prng.random() < 0.5 else _FEMALE)} {prng.choice(_SIMPLE_FAMILY)}"
            for _ in range(150)
        ]
        self.analytes = _analyte_table()

    def offset(self, day: int) -> int:
        """Seconds the EHR's zone is ahead of UTC at noon on ``day`` (days since 1970-01-01)."""
        off = self._offsets.get(day)
        if off is None:
            noon = datetime.fromordinal(day + _EPOCH_ORDINAL).replace(hour=12, tzinfo=self.tz)
            delta = noon.utcoffset()
            off = self._offsets[day] = int(delta.total_seconds()) if delta else 0
        return off

    def slots(self, v: _Vec, lo: pl.Series, hi: pl.Series) -> pl.Series:
        """Quarter-hour slots in clinic hours (08:00-16:45 local) in [lo, hi) per row. Draws outside
        the window are redrawn a few times, then clamped (only windows shorter than a day get that)."""
        m = lo.len()
        frame = pl.DataFrame({"lo": lo, "hi": hi, "t": pl.Series([None] * m, dtype=pl.Int64)})
        first_day = frame.select((pl.col("lo") // _DAY - 1).min()).item() or 0
        last_day = frame.select((pl.col("hi") // _DAY + 1).max()).item() or 0
        offsets = {d: self.offset(d) for d in range(first_day, last_day + 1)}
        for _ in range(6):
            day = (
                pl.col("lo") // _DAY
                - 1
                + (pl.lit(v.u(m)) * (pl.col("hi") // _DAY - pl.col("lo") // _DAY + 3)).floor()
            )
            day = day.cast(pl.Int64)
            draw = day * _DAY + 8 * 3600 + 900 * (pl.lit(v.u(m)) * 36).floor().cast(pl.Int64)
            draw = draw - day.replace_strict(offsets, return_dtype=pl.Int64, default=0)
            bad = pl.col("t").is_null() | (pl.col("t") < pl.col("lo")) | (pl.col("t") >= pl.col("hi"))
            frame = frame.with_columns(t=pl.when(bad).then(draw).otherwise("t"))
        return frame.select(
            pl.col("t").clip(pl.col("lo"), pl.max_horizontal("lo", pl.col("hi") - 1))
        ).to_series()

    def _provider(self, v: _Vec, m: int) -> pl.Series:
        # A few busy providers see many patients, as in a real practice (Pareto).
        rank = ((v.u(m) + 1e-9).pow(-1 / 1.2)).floor().cast(pl.Int64).clip(1, len(self.provider_ids)) - 1
        return rank

    def _visit_numbers(self, kind: str, is_dm: pl.Series) -> pl.Series:
        """VisitNumbers for the Data Model rows: encounters take even slots, appointments odd ones."""
        start = self.counter[kind]
        rank = is_dm.cast(pl.Int64).cum_sum() - 1 + start
        self.counter[kind] = start + int(is_dm.sum())
        parity = 0 if kind == "encounters" else 1
        return (self.ids.visit.series(rank * 2 + parity) + 100_000_000).cast(pl.String)

    def encounters(
        self,
        v: _Vec,
        owners: pl.DataFrame,
        *,
        lo: pl.Series,
        hi: pl.Series,
        now: pl.Series,
        start: pl.Series | None = None,
        klass: pl.Series | None = None,
    ) -> pl.DataFrame:
        """Encounters for ``owners`` (surface, patient), starting in [lo, hi) or at ``start``, as seen
        at ``now``: columns of ``Encounter`` plus ``updated`` (first last_updated) and ``finishes``
        (when an in-progress one will end)."""
        m = owners.height
        if klass is None:
            klass = v.weighted(m, tuple(_CLASS_WEIGHTS.values()))
        if start is None:
            any_time = lo + (v.u(m) * (hi - lo)).floor().cast(pl.Int64)
            slot = self.slots(v, lo, hi)
            start = pl.select(
                pl.when(pl.lit(klass).is_in([_AMBULATORY, _VIRTUAL]))
                .then(pl.lit(slot))
                .otherwise(pl.lit(any_time))
            ).to_series()
        u = {name: v.u(m) for name in ("dur", "status", "upd", "type", "fac", "dept", "reason", "has_reason")}
        types, _, _ = _flat(names.ENCOUNTER_TYPES)  # type: ignore[arg-type]
        depts, _, _ = _flat(names.DEPARTMENTS)  # type: ignore[arg-type]
        reasons, _, _ = _flat(names.REASONS)  # type: ignore[arg-type]
        k = pl.col("klass")
        ud = pl.col("u_dur")
        minutes = (
            pl.when(k == _CLASSES.index("ambulatory"))
            .then(_pick((15, 20, 30, 40, 60), (ud * 5).floor().cast(pl.Int64), pl.Int64()))
            .when(k == _CLASSES.index("virtual"))
            .then(_pick((10, 15, 20, 30), (ud * 4).floor().cast(pl.Int64), pl.Int64()))
            .when(k == _CLASSES.index("emergency"))
            .then(120 + (ud * 481).floor().cast(pl.Int64))
            .when(k == _CLASSES.index("observation"))
            .then(480 + (ud * 1921).floor().cast(pl.Int64))
            .otherwise(1440 + (ud * 10081).floor().cast(pl.Int64))
        )
        is_dm = owners["surface"] == "datamodel"
        frame = owners.with_columns(
            klass=klass,
            start=start,
            now=now,
            **{f"u_{n}": s for n, s in u.items()},
            uuid=v.uuids(m),
            visit=self._visit_numbers("encounters", is_dm),
            provider=self._provider(v, m),
        ).with_columns(end=pl.col("start") + 60 * minutes)
        us, uu = pl.col("u_status"), pl.col("u_upd")
        status = (
            pl.when(pl.col("end") > pl.col("now"))
            .then(pl.lit("in-progress"))
            .when(us < 0.03)
            .then(pl.lit("cancelled"))
            .when(us < 0.045)
            .then(pl.lit("entered-in-error"))
            .otherwise(pl.lit("finished"))
        )
        frame = frame.with_columns(status=status)
        st = pl.col("status")
        updated = (
            pl.when(st == "in-progress")
            .then(pl.col("start") + 60 + (uu * 1740).floor().cast(pl.Int64))
            .when(st == "cancelled")
            .then(pl.col("start") + (uu * 3600).floor().cast(pl.Int64))
            .when(st == "entered-in-error")
            .then(pl.col("end") + 3600 + (uu * 2 * _DAY).floor().cast(pl.Int64))
            .otherwise(pl.col("end") + 300 + (uu * _DAY).floor().cast(pl.Int64))
        )
        type_idx = _by_class(names.ENCOUNTER_TYPES, k, pl.col("u_type"))  # type: ignore[arg-type]
        return frame.select(
            "surface",
            source_id=pl.when(pl.col("surface") == "fhir").then("uuid").otherwise("visit"),
            patient_source_id="patient",
            encounter_class=_pick(_CLASSES, k, pl.String()),
            type_code=_pick([t[0] for t in types], type_idx, pl.String()),  # type: ignore[index]
            type_system=_pick([t[1] for t in types], type_idx, pl.String()),  # type: ignore[index]
            type_display=_pick([t[2] for t in types], type_idx, pl.String()),  # type: ignore[index]
            status="status",
            start_at="start",
            end_at=pl.when(st.is_in(["in-progress", "cancelled"]).not_()).then("end"),
            location=pl.concat_str(
                [
                    _pick(
                        names.FACILITIES,
                        (pl.col("u_fac") * len(names.FACILITIES)).floor().cast(pl.Int64),
                        pl.String(),
                    ),
                    pl.lit(" - "),
                    _pick(depts, _by_class(names.DEPARTMENTS, k, pl.col("u_dept")), pl.String()),  # type: ignore[arg-type]
                ]
            ),
            attending_provider_id=_pick(self.provider_ids, pl.col("provider"), pl.String()),
            attending_provider_name=_pick(self.provider_names, pl.col("provider"), pl.String()),
            reason=pl.when(pl.col("u_has_reason") < 0.85).then(
                _pick(reasons, _by_class(names.REASONS, k, pl.col("u_reason")), pl.String())  # type: ignore[arg-type]
            ),
            updated=pl.min_horizontal(updated, "now"),
            finishes=pl.when(st == "in-progress").then("end"),
        )

    def orders(
        self,
        v: _Vec,
        owners: pl.DataFrame,
        *,
        effective: pl.Series,
        now: pl.Series,
    ) -> pl.DataFrame:
        """One lab order per owner row, collected at ``effective``: one row per result, columns of
        ``Result`` plus ``updated`` and ``preliminary``."""
        m = owners.height
        surface_rank = pl.col("surface").cum_count().over("surface") - 1
        orders = owners.with_columns(
            panel=v.weighted(m, tuple(names.PANEL_WEIGHTS.values())),
            effective=effective,
            now=now,
            u_prelim=v.u(m),
            u_upd=v.u(m),
            u_error=v.u(m),
            order_no=pl.int_range(pl.len()),
        ).with_columns(rank=surface_rank)
        fhir_start, dm_start = self.counter["fhir"], self.counter["datamodel"]
        is_fhir = pl.col("surface") == "fhir"
        n_fhir = int((owners["surface"] == "fhir").sum())
        self.counter["fhir"] += n_fhir
        self.counter["datamodel"] += m - n_fhir
        rank = orders["rank"]
        order_id = (
            pl.when(is_fhir)
            .then(pl.lit(self.ids.order["fhir"].series(rank + fhir_start)))
            .otherwise(pl.lit(self.ids.order["datamodel"].series(rank + dm_start)))
            + 100_000_000
        ).cast(pl.String)
        recent = (pl.col("now") - pl.col("effective")) < 36 * 3600
        orders = orders.with_columns(
            order_id=order_id,
            preliminary=recent & (pl.col("u_prelim") < 0.5),
            error=pl.col("u_error") < 0.003,
        ).with_columns(
            updated=pl.min_horizontal(
                pl.when("preliminary")
                .then(pl.col("effective") + 600 + (pl.col("u_upd") * 3000).floor().cast(pl.Int64))
                .otherwise(
                    pl.col("effective") + 3600 + (pl.col("u_upd") * (_DAY - 3600)).floor().cast(pl.Int64)
                ),
                "now",
            )
        )
        rows = orders.join(self.analytes, on="panel", how="inner").sort("order_no", "position")
        n = rows.height
        # Box-Muller normals; one in twelve values drawn from a wider spread, so abnormals happen.
        z = (-2.0 * (1.0 - v.u(n)).log()).sqrt() * (2 * math.pi * v.u(n)).cos()
        wide = pl.Series(v.u(n) < 0.08)
        rows = rows.with_columns(
            z=z,
            wide=wide,
            u_text=v.u(n),
            uuid=v.uuids(n),
        )
        scale = 10.0 ** pl.col("decimals").cast(pl.Float64)
        raw = pl.col("mean") + pl.col("sd") * pl.col("z") * pl.when("wide").then(2.2).otherwise(1.0)
        value = (pl.max_horizontal(raw, 1.0 / scale) * scale).round() / scale
        rows = rows.with_columns(value=pl.when(pl.col("mean").is_not_null()).then(value))
        val = pl.col("value")
        flag = (
            pl.when(pl.col("crit_low").is_not_null() & (val < pl.col("crit_low")))
            .then(pl.lit("critical_low"))
            .when(pl.col("crit_high").is_not_null() & (val > pl.col("crit_high")))
            .then(pl.lit("critical_high"))
            .when(pl.col("ref_low").is_not_null() & (val < pl.col("ref_low")))
            .then(pl.lit("low"))
            .when(val > pl.col("ref_high"))
            .then(pl.lit("high"))
            .otherwise(pl.lit("normal"))
        )
        positive = pl.col("u_text") < pl.col("p_abnormal")
        is_text = pl.col("mean").is_null()
        return rows.select(
            "surface",
            source_id=pl.when(is_fhir).then("uuid").otherwise(pl.format("{}|{}", "order_id", "code")),
            patient_source_id="patient",
            order_id="order_id",
            code="code",
            code_system=pl.lit(names.LOINC),
            display="display",
            value_num="value",
            value_text=pl.when(is_text).then(
                pl.when(positive).then("abnormal_text").otherwise("normal_text")
            ),
            unit="unit",
            reference_low="ref_low",
            reference_high="ref_high",
            reference_text="normal_text",
            abnormal_flag=pl.when(is_text)
            .then(pl.when(positive).then(pl.lit("abnormal")).otherwise(pl.lit("normal")))
            .otherwise(flag),
            status=pl.when("error")
            .then(pl.lit("entered-in-error"))
            .when("preliminary")
            .then(pl.lit("preliminary"))
            .otherwise(pl.lit("final")),
            effective_at="effective",
            updated="updated",
            preliminary="preliminary",
        )

    def appointments(
        self,
        v: _Vec,
        owners: pl.DataFrame,
        *,
        start: pl.Series,
        now: pl.Series,
        booked_at: pl.Series | None = None,
    ) -> pl.DataFrame:
        """Appointments at ``start`` as seen at ``now``: future ones booked (a few cancelled), past
        ones fulfilled, no-shows, cancelled, ... Columns of ``Appointment`` plus ``updated``.
        With ``booked_at``, every one is a fresh booking made then."""
        m = owners.height
        is_dm = owners["surface"] == "datamodel"
        frame = owners.with_columns(
            start=start,
            now=now,
            booked=booked_at if booked_at is not None else pl.lit(None, dtype=pl.Int64),
            duration=_pick(_DURATIONS, pl.lit(v.weighted(m, _DURATION_WEIGHTS)), pl.Int32()),
            u_status=v.u(m),
            u_upd=v.u(m),
            u_book=v.u(m),
            type_idx=v.weighted(m, (5, 4, 2, 1, 0.3)),
            fac=v.ints(m, 0, len(names.FACILITIES)),
            dept=v.ints(m, 0, len(names.DEPARTMENTS["ambulatory"])),
            reason=v.ints(m, 0, len(names.APPOINTMENT_REASONS)),
            has_reason=v.u(m) < 0.8,
            provider=self._provider(v, m),
            uuid=v.uuids(m),
            visit=self._visit_numbers("appointments", is_dm),
        )
        us, uu = pl.col("u_status"), pl.col("u_upd")
        future = pl.col("start") > pl.col("now")
        fresh = pl.col("booked").is_not_null()
        status = (
            pl.when(fresh)
            .then(pl.lit("booked"))
            .when(future)
            .then(pl.when(us < 0.06).then(pl.lit("cancelled")).otherwise(pl.lit("booked")))
            .when(us < 0.82)
            .then(pl.lit("fulfilled"))
            .when(us < 0.89)
            .then(pl.lit("noshow"))
            .when(us < 0.98)
            .then(pl.lit("cancelled"))
            .when(us < 0.995)
            .then(pl.lit("arrived"))
            .otherwise(pl.lit("entered-in-error"))
        )
        frame = frame.with_columns(status=status)
        st = pl.col("status")
        booked = pl.col("now") - 3600 - (pl.col("u_book") * 60 * _DAY).floor().cast(pl.Int64)
        updated = (
            pl.when(fresh)
            .then("booked")
            .when(future & (st == "booked"))
            .then(booked)
            .when(future)
            .then(booked + 3600 + (uu * 5 * _DAY).floor().cast(pl.Int64))
            .when(st == "fulfilled")
            .then(pl.col("start") + 60 * pl.col("duration") + (uu * _DAY).floor().cast(pl.Int64))
            .when(st == "noshow")
            .then(pl.col("start") + 3600 + (uu * _DAY).floor().cast(pl.Int64))
            .when(st == "cancelled")
            .then(pl.col("start") - 3600 - (uu * 14 * _DAY).floor().cast(pl.Int64))
            .when(st == "arrived")
            .then(pl.col("start") + (uu * 900).floor().cast(pl.Int64))
            .otherwise(pl.col("start") + (uu * 3 * _DAY).floor().cast(pl.Int64))
        )
        return frame.select(
            "surface",
            source_id=pl.when(pl.col("surface") == "fhir").then("uuid").otherwise("visit"),
            patient_source_id="patient",
            status="status",
            start_at="start",
            end_at=pl.col("start") + 60 * pl.col("duration"),
            duration_min="duration",
            type_code=_pick([t[0] for t in names.APPOINTMENT_TYPES], pl.col("type_idx"), pl.String()),
            type_display=_pick([t[1] for t in names.APPOINTMENT_TYPES], pl.col("type_idx"), pl.String()),
            location=pl.concat_str(
                [
                    _pick(names.FACILITIES, pl.col("fac"), pl.String()),
                    pl.lit(" - "),
                    _pick(names.DEPARTMENTS["ambulatory"], pl.col("dept"), pl.String()),
                ]
            ),
            provider_id=_pick(self.provider_ids, pl.col("provider"), pl.String()),
            provider_name=_pick(self.provider_names, pl.col("provider"), pl.String()),
            reason=pl.when("has_reason").then(
                _pick(names.APPOINTMENT_REASONS, pl.col("reason"), pl.String())
            ),
            updated=pl.min_horizontal(updated, "now"),
        )

    @staticmethod
    def lab_value(rng: random.Random, code: str) -> tuple[float, str]:
        """A fresh value and its flag for analyte ``code`` (a corrected result's new value)."""
        _, _, _, decimals, low, high, crit_low, crit_high, mean, sd = _ANALYTES[code]
        value = round(max(rng.gauss(mean, sd), 10.0**-decimals), decimals)
        if crit_low is not None and value < crit_low:
            return value, "critical_low"
        if crit_high is not None and value > crit_high:
            return value, "critical_high"
        if low > 0 and value < low:
            return value, "low"
        return value, "high" if value > high else "normal"


_ENCOUNTER_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Encounter))
_RESULT_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Result))
_APPOINTMENT_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Appointment))
_TIME_FIELDS: Final = frozenset({"start_at", "end_at", "effective_at"})


_MAKE: Final[dict[type, Any]] = {cls: bulk_constructor(cls) for cls in (Encounter, Result, Appointment)}
_NEW_IDENTIFIER: Final = bulk_constructor(Identifier)
_NEW_PATIENT: Final = bulk_constructor(Patient)
_NEW_PERSON: Final = bulk_constructor(Person)


def _records(frame: pl.DataFrame, cls: type, fields: tuple[str, ...]) -> list[Any]:
    """Record objects from a batch frame (epoch-second time columns become aware datetimes)."""
    columns = [_dts(frame[f].to_list()) if f in _TIME_FIELDS else frame[f].to_list() for f in fields]
    return list(itertools.starmap(_MAKE[cls], zip(*columns, strict=True)))


# -- the world ------------------------------------------------------------------------------------


def _patients(frame: pl.DataFrame) -> list[Patient]:
    """Patient records from a batch's patients frame, in frame order."""
    ident = _NEW_IDENTIFIER
    identifiers = [
        tuple([ident(i["system"], i["value"]) for i in row]) for row in frame["identifiers"].to_list()
    ]
    columns: list[Any] = [frame[c].to_list() for c in ("source_surface", "source_id", "person_id")]
    columns += [
        identifiers,
        *(frame[f].to_list() for f in _DEMOGRAPHICS),
        map(tuple, frame["noise"].to_list()),
    ]
    return list(itertools.starmap(_NEW_PATIENT, zip(*columns, strict=True)))


def _persons(frame: pl.DataFrame) -> list[Person]:
    """Person records from a batch's persons frame, in frame order."""
    columns = [frame[c].to_list() for c in ("person_id", *_DEMOGRAPHICS, "hard_group")]
    return list(itertools.starmap(_NEW_PERSON, zip(*columns, strict=True)))


# Heap events: (time, tiebreak, what, surface, source_id, payload). The tiebreak is unique, so
# payloads are never compared.
_Event = tuple[int, int, str, str, str, object]
_FRAME_KINDS: Final[dict[Kind, tuple[type, tuple[str, ...]]]] = {
    "encounters": (Encounter, _ENCOUNTER_FIELDS),
    "results": (Result, _RESULT_FIELDS),
    "appointments": (Appointment, _APPOINTMENT_FIELDS),
}
# Walk-in mix for visits that start "now" during advance (no one is admitted for a week by booking).
_WALK_IN: Final = {"ambulatory": 60, "emergency": 15, "inpatient": 5, "observation": 5, "virtual": 15}


def _const(n: int, value: int) -> pl.Series:
    return pl.repeat(value, n, dtype=pl.Int64, eager=True)


class World:
    """The synthetic world: persons (truth), the store both surfaces serve, and the clock's future.

    ``persons`` maps person_id to Person; ``patients_of`` maps person_id to its surface patients'
    (surface, source_id); ``groups`` maps a hard-group id to its member person_ids. ``clock0`` is
    where the clock started (the end of the configured range).
    """

    def __init__(self, config: PopulationConfig) -> None:
        self.config = config.resolved()
        assert self.config.start is not None and self.config.end is not None
        self.start_at = datetime.combine(self.config.start, datetime.min.time(), UTC)
        self.clock0 = datetime.combine(self.config.end + timedelta(days=1), datetime.min.time(), UTC)
        self.store = Store(self.clock0)
        self.persons: dict[str, Person] = {}
        self.patients_of: dict[str, list[tuple[Surface, str]]] = {}
        self.groups: dict[str, list[str]] = {}
        self._ids = _Ids.of(self.config.seed)
        self._clinic = _Clinic(self._ids, ZoneInfo(self.config.fhir_tz), self.config.seed)
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
        self._vec = _Vec(self._rng)

    @property
    def clock(self) -> datetime:
        return self.store.clock

    # -- building -------------------------------------------------------------------------------

    def _schedule(
        self, at: int, what: str, surface: str = "", source_id: str = "", payload: object = None
    ) -> None:
        heapq.heappush(self._events, (at, next(self._tiebreak), what, surface, source_id, payload))

    def _put(self, kind: Kind, record: Record, at: int | None = None) -> None:
        self.store.put(kind, record, at=None if at is None else _dt(at))
        if kind == "patients":
            assert isinstance(record, Patient)
            self.patients_of[record.person_id].append((record.surface, record.source_id))
            self._patient_ids[record.surface].append(record.source_id)
        else:
            self._record_ids.setdefault((kind, record.surface), []).append(record.source_id)

    def _add_people(self, count: int) -> list[Patient]:
        """Make ``count`` persons and their patient copies (not yet stored), in person order."""
        batch = _people(
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
            _persons(batch.persons), batch.persons["group_id"].to_list(), strict=True
        ):
            order[person.person_id] = len(order)
            self.persons[person.person_id] = person
            self.patients_of[person.person_id] = []
            if group_id is not None:
                self.groups.setdefault(group_id, []).append(person.person_id)
        patients = _patients(batch.patients)
        patients.sort(key=lambda p: (order[p.person_id], p.surface != "fhir"))
        return patients

    def _put_batch(self, kind: Kind, frame: pl.DataFrame, *, at: list[int] | None = None) -> None:
        """Store a batch frame's records, each at its ``updated`` time (build) or schedule each to
        appear at ``at[i]`` (advance), with the follow-up events its state implies."""
        cls, fields = _FRAME_KINDS[kind]
        records = _records(frame, cls, fields)
        follow = frame["finishes"].to_list() if kind == "encounters" else [None] * len(records)
        if at is not None:
            for record, when, finishes in zip(records, at, follow, strict=True):
                self._schedule(when, "put", record.surface, record.source_id, (kind, record, finishes))
            return
        self._put_new(kind, records, _dts(frame["updated"].to_list()))  # type: ignore[arg-type]
        rng = self._rng
        now = _ts(self.clock)
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
            due = max(now + 60, _ts(record.effective_at) + rng.randint(12 * 3600, 48 * 3600))
            self._schedule(due, "finalize", record.surface, record.source_id)
        elif kind == "appointments" and record.status == "booked":  # type: ignore[union-attr]
            assert isinstance(record, Appointment)
            self._booked.append((record.surface, record.source_id))
            self._schedule(_ts(record.end_at), "complete", record.surface, record.source_id)

    def _build(self) -> None:
        patients = self._add_people(self.config.patients)
        lo, now = _ts(self.start_at), _ts(self.clock)
        rng, v, clinic = self._rng, self._vec, self._clinic
        stamps = [rng.randrange(lo, now) if now > lo else now for _ in patients]
        self._put_new("patients", patients, _dts(stamps))  # type: ignore[arg-type]
        owners = pl.DataFrame(
            {"surface": [p.surface for p in patients], "patient": [p.source_id for p in patients]},
            schema={"surface": pl.String(), "patient": pl.String()},
        )
        n, days = owners.height, (now - lo) / _DAY

        visits = _repeat(owners, _poisson_vec(v, n, ENCOUNTERS_PER_90D * days / 90))
        m = visits.height
        frame = clinic.encounters(v, visits, lo=_const(m, lo), hi=_const(m, now), now=_const(m, now))
        self._put_batch("encounters", frame)

        labs = _repeat(owners, _poisson_vec(v, n, ORDERS_PER_90D * days / 90))
        m = labs.height
        slot = clinic.slots(v, _const(m, lo), _const(m, now))
        any_time = lo + (v.u(m) * (now - lo)).floor().cast(pl.Int64)
        effective = pl.select(
            pl.when(pl.lit(v.u(m)) < 0.65).then(pl.lit(slot)).otherwise(pl.lit(any_time))
        ).to_series()
        self._put_batch("results", clinic.orders(v, labs, effective=effective, now=_const(m, now)))

        horizon = now + FUTURE_DAYS * _DAY
        booked = _repeat(owners, _poisson_vec(v, n, APPOINTMENTS_PER_90D * (horizon - lo) / _DAY / 90))
        m = booked.height
        start = clinic.slots(v, _const(m, lo), _const(m, horizon))
        self._put_batch("appointments", clinic.appointments(v, booked, start=start, now=_const(m, now)))
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
        lo, hi = _ts(old), _ts(new)
        if hi > lo:
            self._plan(lo, hi, delta / timedelta(days=1), counts)
        while self._events and self._events[0][0] <= hi:
            at, _, what, surface, sid, payload = heapq.heappop(self._events)
            self.store.clock = max(old, _dt(at))
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
            return sorted(lo + rng.randint(1, hi - lo) for _ in range(_poisson(rng, per_day * days)))

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
        visit_at = times(ENCOUNTERS_PER_90D / 90 * n_patients) if n_patients else []
        order_at = times(ORDERS_PER_90D / 90 * n_patients) if n_patients else []
        book_at = times(APPOINTMENTS_PER_90D / 90 * n_patients) if n_patients else []
        visitors = [self._random_patient() for _ in visit_at]
        orderers = [self._random_patient() for _ in order_at]
        bookers = [self._random_patient() for _ in book_at]

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
            klass = v.weighted(m, [_WALK_IN[c] for c in _CLASSES])
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
            start = clinic.slots(v, t + _DAY, t + 60 * _DAY)
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
            if appt.status == "booked" and _ts(appt.start_at) > now + 3600:
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
            old_start = _ts(appt.start_at)
            start = self._clinic.slots(self._vec, _const(1, at + 3600), _const(1, old_start + 21 * _DAY))[0]
            if start == old_start:
                return
            end = start + 60 * appt.duration_min
            self._put("appointments", dataclasses.replace(appt, start_at=_dt(start), end_at=_dt(end)))
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
                    value, flag = _Clinic.lab_value(rng, result.code)
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
            line, city, state, postal = _new_address(rng)
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
                self._put("encounters", dataclasses.replace(enc, status="finished", end_at=_dt(at)))
                counts["finished_encounters"] += 1
        elif what == "complete":
            booked = self._current("appointments", surface, sid)
            assert isinstance(booked, Appointment)
            if booked.status == "booked" and _ts(booked.end_at) == at:
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
            return _truth(self)


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


_TS: Final = pl.Datetime("us", "UTC")
_ID_LIST: Final = pl.List(pl.Struct({"system": pl.String(), "value": pl.String()}))
# Truth column -> (record attribute, dtype); unified names, so truth compares with the warehouse.
_TRUTH: Final[dict[Kind, dict[str, tuple[str, pl.DataType]]]] = {
    "patients": {
        "source_surface": ("surface", pl.String()),
        "source_id": ("source_id", pl.String()),
        "identifiers": ("identifiers", _ID_LIST),
        "given_name": ("given_name", pl.String()),
        "middle_name": ("middle_name", pl.String()),
        "family_name": ("family_name", pl.String()),
        "birth_date": ("birth_date", pl.Date()),
        "sex": ("sex", pl.String()),
        "ssn": ("ssn", pl.String()),
        "address_line": ("address_line", pl.String()),
        "address_city": ("address_city", pl.String()),
        "address_state": ("address_state", pl.String()),
        "address_postal_code": ("address_postal_code", pl.String()),
        "phone": ("phone", pl.String()),
        "email": ("email", pl.String()),
    },
    "encounters": {
        "source_surface": ("surface", pl.String()),
        "source_id": ("source_id", pl.String()),
        "patient_source_id": ("patient_source_id", pl.String()),
        "class": ("encounter_class", pl.String()),
        "type_code": ("type_code", pl.String()),
        "type_system": ("type_system", pl.String()),
        "type_display": ("type_display", pl.String()),
        "status": ("status", pl.String()),
        "start_at": ("start_at", _TS),
        "end_at": ("end_at", _TS),
        "location": ("location", pl.String()),
        "attending_provider_id": ("attending_provider_id", pl.String()),
        "attending_provider_name": ("attending_provider_name", pl.String()),
        "reason": ("reason", pl.String()),
    },
    "results": {
        "source_surface": ("surface", pl.String()),
        "source_id": ("source_id", pl.String()),
        "patient_source_id": ("patient_source_id", pl.String()),
        "order_id": ("order_id", pl.String()),
        "code": ("code", pl.String()),
        "code_system": ("code_system", pl.String()),
        "display": ("display", pl.String()),
        "value_num": ("value_num", pl.Float64()),
        "value_text": ("value_text", pl.String()),
        "unit": ("unit", pl.String()),
        "reference_low": ("reference_low", pl.Float64()),
        "reference_high": ("reference_high", pl.Float64()),
        "reference_text": ("reference_text", pl.String()),
        "abnormal_flag": ("abnormal_flag", pl.String()),
        "status": ("status", pl.String()),
        "effective_at": ("effective_at", _TS),
    },
    "appointments": {
        "source_surface": ("surface", pl.String()),
        "source_id": ("source_id", pl.String()),
        "patient_source_id": ("patient_source_id", pl.String()),
        "status": ("status", pl.String()),
        "start_at": ("start_at", _TS),
        "end_at": ("end_at", _TS),
        "duration_min": ("duration_min", pl.Int32()),
        "type_code": ("type_code", pl.String()),
        "type_display": ("type_display", pl.String()),
        "location": ("location", pl.String()),
        "provider_id": ("provider_id", pl.String()),
        "provider_name": ("provider_name", pl.String()),
        "reason": ("reason", pl.String()),
    },
}


_ARROW: Final[dict[pl.DataType, pa.DataType]] = {
    pl.String(): pa.large_string(),
    pl.Float64(): pa.float64(),
    pl.Int32(): pa.int32(),
    pl.Int64(): pa.int64(),
    pl.Date(): pa.date32(),
    _TS: pa.timestamp("us", tz="UTC"),
    _ID_LIST: pa.large_list(pa.struct([("system", pa.large_string()), ("value", pa.large_string())])),
}


def _truth(world: World) -> dict[str, pl.DataFrame]:
    # Arrow converts Python columns (datetimes above all) far faster than polars' any-value path.
    out: dict[str, pl.DataFrame] = {}
    for kind, columns in _TRUTH.items():
        versions = [v for surface in SURFACES for v in world.store.query(kind, surface)]
        attrs = [attr for attr, _ in columns.values()]
        values = list(zip(*map(operator.attrgetter(*attrs), (v.record for v in versions)), strict=True))
        if not values:
            values = [() for _ in attrs]
        arrays: dict[str, pa.Array] = {}
        for (column, (attr, dtype)), column_values in zip(columns.items(), values, strict=True):
            if attr == "identifiers":
                column_values = tuple([(i.system, i.value) for i in ids] for ids in column_values)
            arrays[column] = pa.array(column_values, type=_ARROW[dtype])
        arrays["last_updated"] = pa.array([v.last_updated for v in versions], type=_ARROW[_TS])
        arrays["version_id"] = pa.array([v.version_id for v in versions], type=pa.int64())
        schema = {c: t for c, (_, t) in columns.items()} | {"last_updated": _TS, "version_id": pl.Int64()}
        frame = pl.from_arrow(pa.table(arrays))
        assert isinstance(frame, pl.DataFrame)
        out[kind] = frame.cast(schema)  # type: ignore[arg-type]
    rows = [(pid, surface, sid) for pid, patients in world.patients_of.items() for surface, sid in patients]
    out["persons"] = pl.DataFrame(
        rows,
        schema={"person_id": pl.String(), "surface": pl.String(), "source_patient_id": pl.String()},
        orient="row",
    )
    out["hard_groups"] = pl.DataFrame(
        [
            (gid, pid, world.persons[pid].hard_group)
            for gid, members in world.groups.items()
            for pid in members
        ],
        schema={"group_id": pl.String(), "person_id": pl.String(), "hard_group": pl.String()},
        orient="row",
    )
    noisy = [
        (v.record.surface, v.record.source_id, v.record.person_id, list(v.record.noise))  # type: ignore[union-attr]
        for surface in SURFACES
        for v in world.store.query("patients", surface)
    ]
    out["noise"] = pl.DataFrame(
        noisy,
        schema={
            "source_surface": pl.String(),
            "source_id": pl.String(),
            "person_id": pl.String(),
            "noise": pl.List(pl.String()),
        },
        orient="row",
    )
    return out
