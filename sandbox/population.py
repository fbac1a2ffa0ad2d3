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

import bisect
import dataclasses
import heapq
import itertools
import math
import random
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Final
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
    Version,
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
    "hyphenated": 5,
    "married-name": 6,
    "nickname": 12,
    "typo": 15,
    "name-swap": 3,
    "dob-swap": 6,
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

# Unique-id spaces: an affine map (a * i + b) mod n with gcd(a, n) == 1 is a bijection on [0, n), so
# counter i -> id is collision-free and looks random, with no set of used ids to keep.
_MRN_SPACE: Final = 90_000_000  # 8-digit MRNs: FHIR takes even slots, Data Model odd ones
_VISIT_SPACE: Final = 900_000_000  # 9-digit VisitNumbers: encounters even, appointments odd
_ORDER_SPACE: Final = 900_000_000
_ENTERPRISE_SPACE: Final = 9_000_000_000
_SSN_SPACE: Final = 100 * 99 * 9999  # area 900-999, group 01-99, serial 0001-9999
_NPI_SPACE: Final = 900_000_000


@dataclasses.dataclass(frozen=True)
class _Perm:
    a: int
    b: int
    n: int

    def __call__(self, i: int) -> int:
        return (self.a * i + self.b) % self.n

    def series(self, i: pl.Series) -> pl.Series:
        return (i.cast(pl.Int64) * self.a + self.b) % self.n


def _perm(rng: random.Random, n: int) -> _Perm:
    while True:
        a = rng.randrange(n // 3, n - 1)
        if math.gcd(a, n) == 1:
            return _Perm(a, rng.randrange(n), n)


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
        cum = list(itertools.accumulate(weights))
        idx = pl.Series(cum).search_sorted(self.u(n) * cum[-1], side="right")
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
            "hyphen": v.u(m) < 0.05,
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
    for a in anchors:
        kind = rng.choices(HARD_GROUPS, _HARD_WEIGHTS)[0]
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
            ids.enterprise.series(pl.col("index")).cast(pl.String).str.zfill(10)  # type: ignore[arg-type]
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
        rows_noise: list[list[str]] = [[] for _ in range(frame.height)]
        for r, kinds in noise[surface].items():
            rows_noise[r] = kinds
        return frame.select("person_id", "enterprise").with_columns(
            *columns, noise=pl.Series(rows_noise, dtype=pl.List(pl.String))
        )

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
        identifiers=pl.concat_list(
            [
                pl.struct(
                    system=pl.when(is_fhir).then(pl.lit(FHIR_MRN)).otherwise(pl.lit(DM_MRN)), value="mrn"
                ),
                pl.when(pl.col("ehrid").is_not_null()).then(
                    pl.struct(system=pl.lit(DM_EHRID), value="ehrid")
                ),
                pl.when(pl.col("enterprise").is_not_null()).then(
                    pl.struct(system=pl.lit(ENTERPRISE), value="enterprise")
                ),
            ]
        ).list.drop_nulls(),
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
        source_updated_at=pl.lit(base) + pl.duration(seconds=offsets),
    ).select(*(pl.col(c).cast(t) for c, t in _FRAME_SCHEMA.items()), "person_id")


# -- clinical records (per record, in Python) -----------------------------------------------------


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


@dataclasses.dataclass(frozen=True)
class _Provider:
    id: str
    name: str


# Heap events: (time, tiebreak, what, surface, source_id).
_Event = tuple[int, int, str, str, str]


class _Clinic:
    """Makes clinical records for surface patients and schedules what later happens to them."""

    def __init__(self, rng: random.Random, ids: _Ids, tz: ZoneInfo) -> None:
        self.rng = rng
        self.ids = ids
        self.tz = tz
        self._offsets: dict[int, int] = {}
        self.visit_counter = 0
        self.order_counter = {"fhir": 0, "datamodel": 0}
        prng = random.Random(rng.getrandbits(64))
        self.providers = tuple(
            _Provider(
                f"1{ids.npi(i):09d}",
                f"{prng.choice(_MALE if prng.random() < 0.5 else _FEMALE)} {prng.choice(_SIMPLE_FAMILY)}",
            )
            for i in range(150)
        )
        self.class_names = tuple(_CLASS_WEIGHTS)
        self.class_cum = list(itertools.accumulate(_CLASS_WEIGHTS.values()))
        self.panel_names = tuple(names.PANEL_WEIGHTS)
        self.panel_cum = list(itertools.accumulate(names.PANEL_WEIGHTS.values()))

    # time helpers: clinical times are drawn as local wall-clock times in the EHR's zone.
    def _offset(self, day: int) -> int:
        off = self._offsets.get(day)
        if off is None:
            noon = datetime.fromordinal(day + _EPOCH_ORDINAL).replace(hour=12, tzinfo=self.tz)
            delta = noon.utcoffset()
            off = self._offsets[day] = int(delta.total_seconds()) if delta else 0
        return off

    def local(self, day: int, second: int) -> int:
        """UTC epoch seconds of a local wall-clock time on day ``day`` (days since 1970-01-01)."""
        return day * _DAY + second - self._offset(day)

    def clinic_slot(self, lo: int, hi: int) -> int:
        """A quarter-hour slot in clinic hours (08:00-16:45 local) within [lo, hi), or lo if none."""
        rng = self.rng
        for _ in range(8):
            day = rng.randrange(lo // _DAY - 1, hi // _DAY + 1)
            t = self.local(day, 8 * 3600 + 900 * rng.randrange(36))
            if lo <= t < hi:
                return t
        return lo

    def any_time(self, lo: int, hi: int) -> int:
        return self.rng.randrange(lo, max(hi, lo + 1))

    def provider(self) -> _Provider:
        # A few busy providers see many patients, as in a real practice.
        return self.providers[min(int(self.rng.paretovariate(1.2)) - 1, len(self.providers) - 1)]

    def encounter_id(self, surface: str) -> str:
        if surface == "fhir":
            return _uuid(self.rng)
        self.visit_counter += 1
        return str(self.ids.visit(2 * self.visit_counter) + 100_000_000)

    def appointment_id(self, surface: str) -> str:
        if surface == "fhir":
            return _uuid(self.rng)
        self.visit_counter += 1
        return str(self.ids.visit(2 * self.visit_counter + 1) + 100_000_000)

    def order_id(self, surface: str) -> str:
        self.order_counter[surface] += 1
        return str(self.ids.order[surface](self.order_counter[surface]) + 100_000_000)

    # records
    def encounter(
        self, surface: Surface, patient: str, start: int, now: int, *, klass: str | None = None
    ) -> tuple[Encounter, int, int | None]:
        """An encounter starting at ``start``; returns it, its first last_updated, and the time it
        will finish if it is still in progress at ``now``."""
        rng = self.rng
        if klass is None:
            klass = self.class_names[bisect.bisect_right(self.class_cum, rng.random() * self.class_cum[-1])]
        minutes = {
            "ambulatory": lambda: rng.choice((15, 20, 30, 40, 60)),
            "virtual": lambda: rng.choice((10, 15, 20, 30)),
            "emergency": lambda: rng.randint(120, 600),
            "observation": lambda: rng.randint(8 * 60, 40 * 60),
            "inpatient": lambda: rng.randint(24 * 60, 8 * 24 * 60),
        }[klass]()
        end = start + 60 * minutes
        code, system, display = rng.choice(names.ENCOUNTER_TYPES[klass])
        provider = self.provider()
        finishes: int | None = None
        end_at: datetime | None = _dt(end)
        roll = rng.random()
        if end > now:
            status, end_at, finishes = "in-progress", None, end
            updated = min(now, start + rng.randint(60, 1800))
        elif roll < 0.03:
            status, end_at = "cancelled", None
            updated = min(now, start + rng.randint(0, 3600))
        elif roll < 0.045:
            status = "entered-in-error"
            updated = min(now, end + rng.randint(3600, 3 * _DAY))
        else:
            status = "finished"
            updated = min(now, end + rng.randint(300, _DAY))
        record = Encounter(
            surface=surface,
            source_id=self.encounter_id(surface),
            patient_source_id=patient,
            encounter_class=klass,
            type_code=code,
            type_system=system,
            type_display=display,
            status=status,
            start_at=_dt(start),
            end_at=end_at,
            location=f"{rng.choice(names.FACILITIES)} - {rng.choice(names.DEPARTMENTS[klass])}",
            attending_provider_id=provider.id,
            attending_provider_name=provider.name,
            reason=rng.choice(names.REASONS[klass]) if rng.random() < 0.85 else None,
        )
        return record, updated, finishes

    def lab_value(self, analyte: names.Analyte) -> tuple[float, str]:
        _, _, _, decimals, low, high, crit_low, crit_high, mean, sd = analyte
        rng = self.rng
        value = rng.gauss(mean, sd * (2.2 if rng.random() < 0.08 else 1.0))
        value = round(max(value, 10.0**-decimals), decimals)
        if crit_low is not None and value < crit_low:
            flag = "critical_low"
        elif crit_high is not None and value > crit_high:
            flag = "critical_high"
        elif low > 0 and value < low:
            flag = "low"
        elif value > high:
            flag = "high"
        else:
            flag = "normal"
        return value, flag

    def order(
        self, surface: Surface, patient: str, effective: int, now: int
    ) -> list[tuple[Result, int, bool]]:
        """One lab order's results; each with its first last_updated and whether it is preliminary."""
        rng = self.rng
        panel = self.panel_names[bisect.bisect_right(self.panel_cum, rng.random() * self.panel_cum[-1])]
        order_id = self.order_id(surface)
        recent = now - effective < 36 * 3600
        preliminary = recent and rng.random() < 0.5
        if preliminary:
            updated = min(now, effective + rng.randint(600, 3600))
        else:
            updated = min(now, effective + rng.randint(3600, _DAY))
        error = rng.random() < 0.003
        out = []
        for analyte in names.PANELS[panel]:
            code, display = analyte[0], analyte[1]
            if len(analyte) == 5:
                _, _, normal, abnormal, p = analyte
                positive = rng.random() < p
                value_num, value_text, unit = None, abnormal if positive else normal, None
                low = high = None
                ref_text: str | None = normal
                flag = "abnormal" if positive else "normal"
            else:
                value_num, flag = self.lab_value(analyte)  # type: ignore[arg-type]
                value_text, unit, ref_text = None, analyte[2], None
                low = analyte[4] if analyte[4] > 0 else None  # type: ignore[operator]
                high = analyte[5]  # type: ignore[misc]
            status = "entered-in-error" if error else ("preliminary" if preliminary else "final")
            result = Result(
                surface=surface,
                source_id=_uuid(rng) if surface == "fhir" else f"{order_id}|{code}",
                patient_source_id=patient,
                order_id=order_id,
                code=code,
                code_system=names.LOINC,
                display=display,
                value_num=value_num,
                value_text=value_text,
                unit=unit,  # type: ignore[arg-type]
                reference_low=low,  # type: ignore[arg-type]
                reference_high=high,  # type: ignore[arg-type]
                reference_text=ref_text,
                abnormal_flag=flag,
                status=status,
                effective_at=_dt(effective),
            )
            out.append((result, updated, preliminary))
        return out

    def appointment(
        self, surface: Surface, patient: str, start: int, now: int, *, booked_at: int | None = None
    ) -> tuple[Appointment, int]:
        rng = self.rng
        duration = rng.choices(_DURATIONS, _DURATION_WEIGHTS)[0]
        roll = rng.random()
        if start > now:
            status = "cancelled" if roll < 0.06 else "booked"
            updated = booked_at if booked_at is not None else now - rng.randint(3600, 60 * _DAY)
            if status == "cancelled":
                updated = min(now, updated + rng.randint(3600, 5 * _DAY))
        else:
            if roll < 0.82:
                status, updated = "fulfilled", start + 60 * duration + rng.randint(0, _DAY)
            elif roll < 0.89:
                status, updated = "noshow", start + rng.randint(3600, _DAY)
            elif roll < 0.98:
                status, updated = "cancelled", start - rng.randint(3600, 14 * _DAY)
            elif roll < 0.995:
                status, updated = "arrived", start + rng.randint(0, 900)
            else:
                status, updated = "entered-in-error", start + rng.randint(0, 3 * _DAY)
            updated = min(now, updated)
        code, display = rng.choices(names.APPOINTMENT_TYPES, (5, 4, 2, 1, 0.3))[0]
        provider = self.provider()
        record = Appointment(
            surface=surface,
            source_id=self.appointment_id(surface),
            patient_source_id=patient,
            status=status,
            start_at=_dt(start),
            end_at=_dt(start + 60 * duration),
            duration_min=duration,
            type_code=code,
            type_display=display,
            location=f"{rng.choice(names.FACILITIES)} - {rng.choice(names.DEPARTMENTS['ambulatory'])}",
            provider_id=provider.id,
            provider_name=provider.name,
            reason=rng.choice(names.APPOINTMENT_REASONS) if rng.random() < 0.8 else None,
        )
        return record, updated


# -- the world ------------------------------------------------------------------------------------


def _patient(row: dict[str, object]) -> Patient:
    idents = row["identifiers"]
    assert isinstance(idents, list)
    noise = row["noise"]
    assert isinstance(noise, list)
    return Patient(
        surface=row["source_surface"],  # type: ignore[arg-type]
        source_id=row["source_id"],  # type: ignore[arg-type]
        person_id=row["person_id"],  # type: ignore[arg-type]
        identifiers=tuple(Identifier(i["system"], i["value"]) for i in idents),
        given_name=row["given_name"],  # type: ignore[arg-type]
        middle_name=row["middle_name"],  # type: ignore[arg-type]
        family_name=row["family_name"],  # type: ignore[arg-type]
        birth_date=row["birth_date"],  # type: ignore[arg-type]
        sex=row["sex"],  # type: ignore[arg-type]
        ssn=row["ssn"],  # type: ignore[arg-type]
        address_line=row["address_line"],  # type: ignore[arg-type]
        address_city=row["address_city"],  # type: ignore[arg-type]
        address_state=row["address_state"],  # type: ignore[arg-type]
        address_postal_code=row["address_postal_code"],  # type: ignore[arg-type]
        phone=row["phone"],  # type: ignore[arg-type]
        email=row["email"],  # type: ignore[arg-type]
        noise=tuple(noise),
    )


def _person(row: dict[str, object]) -> Person:
    return Person(
        person_id=row["person_id"],  # type: ignore[arg-type]
        given_name=row["given_name"],  # type: ignore[arg-type]
        middle_name=row["middle_name"],  # type: ignore[arg-type]
        family_name=row["family_name"],  # type: ignore[arg-type]
        birth_date=row["birth_date"],  # type: ignore[arg-type]
        sex=row["sex"],  # type: ignore[arg-type]
        ssn=row["ssn"],  # type: ignore[arg-type]
        address_line=row["address_line"],  # type: ignore[arg-type]
        address_city=row["address_city"],  # type: ignore[arg-type]
        address_state=row["address_state"],  # type: ignore[arg-type]
        address_postal_code=row["address_postal_code"],  # type: ignore[arg-type]
        phone=row["phone"],  # type: ignore[arg-type]
        email=row["email"],  # type: ignore[arg-type]
        hard_group=row["hard_group"],  # type: ignore[arg-type]
    )


class World:
    """The synthetic world: persons (truth), the store both surfaces serve, and the clock's future.

    ``persons`` maps person_id to Person; ``patients_of`` maps person_id to its surface patients'
    (surface, source_id); ``groups`` maps a hard-group id to its member person_ids.
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
        self._rng = random.Random(f"redox-sandbox:{self.config.seed}:build")
        self._clinic = _Clinic(self._rng, self._ids, ZoneInfo(self.config.fhir_tz))
        self._events: list[_Event] = []
        self._tiebreak = itertools.count()
        self._next_person = 0
        self._next_patient = {"fhir": 0, "datamodel": 0}
        self._patient_ids: dict[Surface, list[str]] = {"fhir": [], "datamodel": []}
        # Every record id, per kind and surface, in creation order: what random changes pick from.
        self._record_ids: dict[tuple[Kind, Surface], list[str]] = {}
        # Booked appointments whose slot has not come yet (pruned lazily when picked).
        self._booked: list[tuple[Surface, str]] = []

    @property
    def clock(self) -> datetime:
        return self.store.clock

    # -- building -------------------------------------------------------------------------------

    def _schedule(self, at: int, what: str, surface: str, source_id: str) -> None:
        heapq.heappush(self._events, (at, next(self._tiebreak), what, surface, source_id))

    def _put(self, kind: Kind, record: Record, at: int | None = None) -> None:
        self.store.put(kind, record, at=None if at is None else _dt(at))
        if kind != "patients":
            self._record_ids.setdefault((kind, record.surface), []).append(record.source_id)

    def _add_people(self, count: int, created: list[int] | None = None) -> list[Patient]:
        """Make ``count`` persons with their patient copies, put the patients (at ``created[i]``
        for person i, or backdated across the range when building), and return the new patients."""
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
        for row in batch.persons.iter_rows(named=True):
            person = _person(row)
            order[person.person_id] = len(order)
            self.persons[person.person_id] = person
            self.patients_of[person.person_id] = []
            if row["group_id"] is not None:
                self.groups.setdefault(row["group_id"], []).append(person.person_id)
        patients = [_patient(row) for row in batch.patients.iter_rows(named=True)]
        # Put in person order (both copies of a person together), so seq order is stable and natural.
        patients.sort(key=lambda p: (order[p.person_id], p.surface != "fhir"))
        lo, hi = _ts(self.start_at), _ts(self.clock)
        for patient in patients:
            self.patients_of[patient.person_id].append((patient.surface, patient.source_id))
            self._patient_ids[patient.surface].append(patient.source_id)
            if created is None:
                at = self._rng.randrange(lo, hi) if hi > lo else hi
            else:
                at = created[order[patient.person_id]]
            self.store.put("patients", patient, at=_dt(at))
        return patients

    def _history(self, patient: Patient, lo: int, now: int) -> None:
        """A patient's visits, labs and appointments from ``lo`` to ``now`` (and booked beyond)."""
        rng, clinic, surface, pid = self._rng, self._clinic, patient.surface, patient.source_id
        days = (now - lo) / _DAY
        encounters = []
        for _ in range(_poisson(rng, ENCOUNTERS_PER_90D * days / 90)):
            klass = clinic.class_names[
                bisect.bisect_right(clinic.class_cum, rng.random() * clinic.class_cum[-1])
            ]
            start = (
                clinic.clinic_slot(lo, now)
                if klass in ("ambulatory", "virtual")
                else clinic.any_time(lo, now)
            )
            enc, updated, finishes = clinic.encounter(surface, pid, start, now, klass=klass)
            self._put("encounters", enc, updated)
            encounters.append(start)
            if finishes is not None:
                self._schedule(finishes, "finish", surface, enc.source_id)
        for _ in range(_poisson(rng, ORDERS_PER_90D * days / 90)):
            if encounters and rng.random() < 0.6:
                effective = min(now - 60, rng.choice(encounters) + rng.randint(600, 3 * 3600))
            else:
                effective = clinic.clinic_slot(lo, now)
            self._put_order(surface, pid, max(lo, effective), now)
        horizon = now + FUTURE_DAYS * _DAY
        for _ in range(_poisson(rng, APPOINTMENTS_PER_90D * (horizon - lo) / _DAY / 90)):
            start = clinic.clinic_slot(lo, horizon)
            appt, updated = clinic.appointment(surface, pid, start, now)
            self._put("appointments", appt, max(min(updated, now), _ts(self.start_at) - 60 * _DAY))
            if appt.status == "booked":
                self._booked.append((surface, appt.source_id))
                self._schedule(start + 60 * appt.duration_min, "complete", surface, appt.source_id)

    def _put_order(self, surface: Surface, patient: str, effective: int, now: int) -> int:
        results = self._clinic.order(surface, patient, effective, now)
        for result, updated, preliminary in results:
            self._put("results", result, updated)
            if preliminary:
                self._schedule(
                    effective + self._rng.randint(12 * 3600, 48 * 3600), "finalize", surface, result.source_id
                )
        return len(results)

    def _build(self) -> None:
        patients = self._add_people(self.config.patients)
        lo, now = _ts(self.start_at), _ts(self.clock)
        for patient in patients:
            self._history(patient, lo, now)
        # Everything else (advance's draws) comes from its own stream, so that building a world and
        # then advancing it is reproducible whatever build consumed.
        self._rng = random.Random(f"redox-sandbox:{self.config.seed}:advance")
        self._clinic.rng = self._rng

    # -- advancing ------------------------------------------------------------------------------

    def advance(self, delta: timedelta) -> dict[str, int]:
        """Move the clock forward by ``delta`` and write what happened meanwhile, each change a new
        version stamped at its own time in (old clock, new clock]. Returns counts per change kind."""
        if delta < timedelta(0):
            raise ValueError("the sandbox clock only moves forward")
        counts = dict.fromkeys(CHANGE_KINDS, 0)
        old = self.clock
        new = old + delta
        lo, hi = _ts(old), _ts(new)
        rng, days = self._rng, delta / timedelta(days=1)
        n_patients = sum(len(v) for v in self._patient_ids.values())
        n_results = sum(len(self._record_ids.get(("results", s), ())) for s in SURFACES)
        span = hi - lo
        if span >= 1:
            rates = {
                "new_person": _NEW_PERSONS_PER_DAY * len(self.persons),
                "new_encounter": ENCOUNTERS_PER_90D / 90 * n_patients,
                "new_order": ORDERS_PER_90D / 90 * n_patients,
                "new_appointment": APPOINTMENTS_PER_90D / 90 * n_patients,
                "reschedule": _RESCHEDULE_PER_DAY * n_patients,
                "cancel": _CANCEL_PER_DAY * n_patients,
                "correct": _CORRECT_PER_DAY * n_results,
                "error": _ERROR_PER_DAY * n_patients,
                "patient_update": _PATIENT_UPDATE_PER_DAY * n_patients,
            }
            new_people_at: list[int] = []
            for what, per_day in rates.items():
                for _ in range(_poisson(rng, per_day * days)):
                    at = lo + rng.randint(1, span)
                    if what == "new_person":
                        new_people_at.append(at)
                    else:
                        self._schedule(at, what, "", "")
            if new_people_at:
                new_people_at.sort()
                # New persons' patients are made up front (one vectorized batch) and appear at
                # their own times; their first visit is scheduled with them.
                self.store.clock = new
                fresh = self._add_people(len(new_people_at), created=new_people_at)
                self.store.clock = old
                counts["new_persons"] = len(new_people_at)
                counts["new_patients"] = len(fresh)
                for patient in fresh:
                    created = _ts(
                        self.store.current("patients", patient.surface, patient.source_id).last_updated
                    )  # type: ignore[union-attr]
                    self._schedule(
                        created + rng.randint(300, 3600), "first_visit", patient.surface, patient.source_id
                    )
        while self._events and self._events[0][0] <= hi:
            at, _, what, surface, sid = heapq.heappop(self._events)
            self.store.clock = _dt(max(at, lo + 1) if at <= lo else at)
            self._apply(what, surface, sid, at, hi, counts)  # type: ignore[arg-type]
        self.store.clock = new
        return counts

    def _pick(self, kind: Kind) -> tuple[Surface, str] | None:
        """A random existing record of ``kind``, from either surface in proportion to its size."""
        fhir = self._record_ids.get((kind, "fhir"), [])
        dm = self._record_ids.get((kind, "datamodel"), [])
        if not fhir and not dm:
            return None
        i = self._rng.randrange(len(fhir) + len(dm))
        return ("fhir", fhir[i]) if i < len(fhir) else ("datamodel", dm[i - len(fhir)])

    def _pick_booked(self, now: int) -> Version | None:
        while self._booked:
            i = self._rng.randrange(len(self._booked))
            surface, sid = self._booked[i]
            version = self.store.current("appointments", surface, sid)
            assert version is not None
            record = version.record
            assert isinstance(record, Appointment)
            if record.status == "booked" and _ts(record.start_at) > now + 3600:
                return version
            self._booked[i] = self._booked[-1]
            self._booked.pop()
        return None

    def _random_patient(self) -> tuple[Surface, str]:
        fhir, dm = self._patient_ids["fhir"], self._patient_ids["datamodel"]
        i = self._rng.randrange(len(fhir) + len(dm))
        return ("fhir", fhir[i]) if i < len(fhir) else ("datamodel", dm[i - len(fhir)])

    def _apply(self, what: str, surface: Surface, sid: str, at: int, hi: int, counts: dict[str, int]) -> None:
        rng, clinic, store = self._rng, self._clinic, self.store
        if what in ("new_encounter", "first_visit"):
            if what == "new_encounter":
                surface, sid = self._random_patient()
            klass = rng.choices(
                ("ambulatory", "virtual", "emergency", "observation", "inpatient"), (60, 15, 15, 5, 5)
            )[0]
            enc, _, finishes = clinic.encounter(surface, sid, at, at, klass=klass)
            self._put("encounters", enc)
            counts["new_encounters"] += 1
            if finishes is not None:
                self._schedule(finishes, "finish", surface, enc.source_id)
            if what == "first_visit" and rng.random() < 0.6:
                start = clinic.clinic_slot(at + _DAY, at + 45 * _DAY)
                self._book(surface, sid, start, at, counts)
        elif what == "new_order":
            surface, sid = self._random_patient()
            results = clinic.order(surface, sid, at, at)
            for result, _, preliminary in results:
                self._put("results", result)
                if preliminary:
                    self._schedule(
                        at + rng.randint(2 * 3600, 24 * 3600), "finalize", surface, result.source_id
                    )
            counts["new_results"] += len(results)
        elif what == "new_appointment":
            surface, sid = self._random_patient()
            self._book(surface, sid, clinic.clinic_slot(at + _DAY, at + 60 * _DAY), at, counts)
        elif what in ("reschedule", "cancel"):
            version = self._pick_booked(at)
            if version is None:
                return
            appt = version.record
            assert isinstance(appt, Appointment)
            if what == "cancel":
                self._put("appointments", dataclasses.replace(appt, status="cancelled"))
                counts["cancelled"] += 1
                return
            start = clinic.clinic_slot(at + 3600, _ts(appt.start_at) + 21 * _DAY)
            if start == _ts(appt.start_at):
                return
            moved = dataclasses.replace(appt, start_at=_dt(start), end_at=_dt(start + 60 * appt.duration_min))
            self._put("appointments", moved)
            self._schedule(start + 60 * appt.duration_min, "complete", appt.surface, appt.source_id)
            counts["rescheduled"] += 1
        elif what == "correct":
            for _ in range(5):
                picked = self._pick("results")
                if picked is None:
                    return
                version = store.current("results", *picked)
                assert version is not None
                result = version.record
                assert isinstance(result, Result)
                if result.status == "final" and result.value_num is not None:
                    value, flag = clinic.lab_value(_ANALYTES[result.code])
                    self._put(
                        "results",
                        dataclasses.replace(result, status="corrected", value_num=value, abnormal_flag=flag),
                    )
                    counts["corrected"] += 1
                    return
        elif what == "error":
            kind: Kind = rng.choice(("encounters", "results", "appointments"))
            picked = self._pick(kind)
            if picked is None:
                return
            version = store.current(kind, *picked)
            assert version is not None
            record = version.record
            if record.status != "entered-in-error":  # type: ignore[union-attr]
                self._put(kind, dataclasses.replace(record, status="entered-in-error"))  # type: ignore[type-var]
                counts["entered_in_error"] += 1
        elif what == "patient_update":
            surface, sid = self._random_patient()
            version = store.current("patients", surface, sid)
            assert version is not None
            patient = version.record
            assert isinstance(patient, Patient)
            line, city, state, postal = _new_address(rng)
            noise = patient.noise if "moved" in patient.noise else (*patient.noise, "moved")
            updated = dataclasses.replace(
                patient,
                address_line=line,
                address_city=city,
                address_state=state,
                address_postal_code=postal,
                noise=noise,
            )
            self.store.put("patients", updated)
            counts["patients_updated"] += 1
        elif what == "finish":
            version = store.current("encounters", surface, sid)
            assert version is not None
            enc = version.record
            assert isinstance(enc, Encounter)
            if enc.status == "in-progress":
                self._put("encounters", dataclasses.replace(enc, status="finished", end_at=_dt(at)))
                counts["finished_encounters"] += 1
        elif what == "complete":
            version = store.current("appointments", surface, sid)
            assert version is not None
            appt = version.record
            assert isinstance(appt, Appointment)
            if appt.status == "booked" and _ts(appt.end_at) == at:
                status = "fulfilled" if rng.random() < 0.9 else "noshow"
                self._put("appointments", dataclasses.replace(appt, status=status))
                counts["appointments_completed"] += 1
        elif what == "finalize":
            version = store.current("results", surface, sid)
            assert version is not None
            result = version.record
            assert isinstance(result, Result)
            if result.status == "preliminary":
                self._put("results", dataclasses.replace(result, status="final"))
                counts["results_finalized"] += 1

    def _book(self, surface: Surface, patient: str, start: int, now: int, counts: dict[str, int]) -> None:
        appt, _ = self._clinic.appointment(surface, patient, start, now, booked_at=now)
        if appt.status != "booked":
            appt = dataclasses.replace(appt, status="booked")
        self._put("appointments", appt)
        self._booked.append((surface, appt.source_id))
        self._schedule(start + 60 * appt.duration_min, "complete", surface, appt.source_id)
        counts["new_appointments"] += 1

    # -- truth ----------------------------------------------------------------------------------

    def truth(self) -> dict[str, pl.DataFrame]:
        """The current version of every record as polars frames named like the unified schema.

        ``persons`` (person_id, surface, source_patient_id): which surface patients are one person.
        ``patients``/``encounters``/``results``/``appointments``: unified columns minus the
        ``*_source`` ones and ``source_updated_at``, plus ``last_updated`` and ``version_id``.
        Extras for diagnostics: ``hard_groups`` (group_id, person_id, hard_group) and ``noise``
        (source_surface, source_id, person_id, noise).
        """
        return _truth(self)


def build(config: PopulationConfig) -> World:
    """Generate the world ``config`` describes, with every record in its store."""
    world = World(config)
    world._build()
    return world


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


def _truth(world: World) -> dict[str, pl.DataFrame]:
    out: dict[str, pl.DataFrame] = {}
    for kind, columns in _TRUTH.items():
        versions = [v for surface in SURFACES for v in world.store.query(kind, surface)]
        data: dict[str, list[object]] = {}
        for column, (attr, _) in columns.items():
            values = [getattr(v.record, attr) for v in versions]
            if attr == "identifiers":
                values = [[{"system": i.system, "value": i.value} for i in ids] for ids in values]
            data[column] = values
        data["last_updated"] = [v.last_updated for v in versions]
        data["version_id"] = [v.version_id for v in versions]
        schema = {c: t for c, (_, t) in columns.items()} | {"last_updated": _TS, "version_id": pl.Int64()}
        out[kind] = pl.DataFrame(data, schema=schema)
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
