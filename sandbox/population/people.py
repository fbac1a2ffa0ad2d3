"""Persons and their patient copies, made in vectorized batches: canonical demographics, hard
non-match groups (twins, same name and birth date, households), which surfaces a person is on, noise
between the copies, and each copy's identifiers. Also the standalone patient frame the identity
benchmark uses.

Invariants: one patient per person per surface, ``person_id`` the only link between copies;
identifiers are unique per system across persons (a Data Model MRN may equal another person's FHIR
MRN, deliberately, as a decoy); the enterprise identifier is the same value on both surfaces.
"""

import dataclasses
import itertools
import math
import random
from datetime import UTC, date, datetime, timedelta
from typing import Final

import polars as pl
import pyarrow as pa

from sandbox import names
from sandbox.population.draws import Vec, zipf
from sandbox.population.epoch import DAY
from sandbox.population.ids import DM_EHRID, DM_MRN, ENTERPRISE, FHIR_MRN, SURFACES, Ids
from sandbox.population.noise import apply_noise, draw_noise
from sandbox.population.pools import FAMILY, FEMALE, MALE, SIMPLE_FAMILY

# -- population shape -----------------------------------------------------------------------------

P_BOTH: Final = 0.60
P_FHIR_ONLY: Final = 0.20  # the rest (0.20) are on the Data Model surface only
P_ENTERPRISE: Final = 0.50  # of persons on both surfaces
HARD_RATE: Final = 0.025  # share of persons in a hard non-match group
HARD_GROUPS: Final = ("twin", "same-name-dob", "household")
_HARD_WEIGHTS: Final = (0.40, 0.25, 0.35)
_HOUSEHOLD_OF_THREE: Final = 0.4
_P_DECOY: Final = 0.005  # of Data Model patients whose MRN value is some other person's FHIR MRN


# -- persons and their patient copies (vectorized) ------------------------------------------------


@dataclasses.dataclass
class Batch:
    persons: pl.DataFrame  # person_id, canonical demographics, hard_group, group_id, on_fhir, on_dm
    patients: pl.DataFrame  # unified patient columns + sex_source, person_id, noise
    fhir_count: int
    dm_count: int


DEMOGRAPHICS: Final = (
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


def _canonical(v: Vec, ids: Ids, first_person: int, m: int, today: date) -> pl.DataFrame:
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
    male, female = pl.Series(MALE), pl.Series(FEMALE)
    given_m = male.gather(v.weighted(m, zipf(len(MALE), 8)))
    given_f = female.gather(v.weighted(m, zipf(len(FEMALE), 8)))
    middle_m = male.gather(v.weighted(m, zipf(len(MALE), 20)))
    middle_f = female.gather(v.weighted(m, zipf(len(FEMALE), 20)))
    family_w = zipf(len(FAMILY), 15)
    family_a = pl.Series(FAMILY).gather(v.weighted(m, family_w))
    family_b = pl.Series(SIMPLE_FAMILY).gather(v.weighted(m, zipf(len(SIMPLE_FAMILY), 15)))
    # Age: a broad adult bulk plus children, in days so that birthdays fall on every date.
    age_days = (v.u(m).pow(1.15) * 92 * 365.25).cast(pl.Int64)
    street = pl.Series(names.STREET_NAMES).gather(v.weighted(m, zipf(len(names.STREET_NAMES), 30)))
    suffix = pl.Series(names.STREET_SUFFIXES).gather(v.weighted(m, zipf(len(names.STREET_SUFFIXES), 2)))
    city_idx = v.weighted(m, zipf(len(names.CITIES), 25))
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
    return frame.select("index", "person_id", *DEMOGRAPHICS)


def _next_name(name: str, sex: str) -> str:
    """A different given name for a twin who drew the same one: the next in the list that holds it.

    People whose sex is neither female nor male get a name from either list, so the list is found
    by the name, not assumed from the sex.
    """
    for pool in (FEMALE, MALE) if sex == "female" else (MALE, FEMALE):
        if name in pool:
            return pool[(pool.index(name) + 1) % len(pool)]
    pool = FEMALE if sex == "female" else MALE
    return pool[0] if pool[0] != name else pool[1]


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
                    given_fix[r] = _next_name(cols["given_name"][a], cols["sex"][r])
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


def make_people(
    rng: random.Random,
    ids: Ids,
    *,
    first_person: int,
    count: int,
    fhir_start: int,
    dm_start: int,
    today: date,
) -> Batch:
    """``count`` new persons (indexes from ``first_person``) and their patient copies."""
    v = Vec(rng)
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
        s: {f: ([], []) for f in DEMOGRAPHICS} for s in SURFACES
    }
    noise: dict[str, dict[int, list[str]]] = {s: {} for s in SURFACES}
    for row in both.select("fhir_row", "dm_row", "linked", *DEMOGRAPHICS).iter_rows(named=True):
        canonical: dict[str, object] = row
        kinds = draw_noise(rng, canonical, bool(row["linked"]), today)
        if not kinds:
            continue
        copies: dict[str, dict[str, object]] = {s: dict(canonical) for s in SURFACES}
        applied: dict[str, list[str]] = {s: [] for s in SURFACES}
        for kind in kinds:
            target: str = "fhir" if rng.random() < 0.5 else "datamodel"
            if apply_noise(rng, kind, copies[target]):
                applied[target].append(kind)
            elif apply_noise(rng, kind, copies["datamodel" if target == "fhir" else "fhir"]):
                applied["datamodel" if target == "fhir" else "fhir"].append(kind)
        rows = {"fhir": int(row["fhir_row"]), "datamodel": int(row["dm_row"])}
        for s in SURFACES:
            if applied[s]:
                noise[s][rows[s]] = applied[s]
            for field in DEMOGRAPHICS:
                if copies[s][field] != canonical[field]:
                    idx, vals = overrides[s][field]
                    idx.append(rows[s])
                    vals.append(copies[s][field])

    def surface_copy(frame: pl.DataFrame, surface: str) -> pl.DataFrame:
        columns = []
        for field in DEMOGRAPHICS:
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
        *DEMOGRAPHICS[:5],
        "sex_source",
        *DEMOGRAPHICS[5:],
        "person_id",
        "noise",
    )
    return Batch(persons=persons, patients=patients, fhir_count=n_fhir, dm_count=n_dm)


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
    batch = make_people(
        rng, Ids.of(seed), first_person=0, count=persons, fhir_start=0, dm_start=0, today=today
    )
    frame = batch.patients.sort("person_id", "source_surface").head(n)
    offsets = Vec(rng).ints(frame.height, 0, 400 * DAY)
    base = datetime(2024, 1, 1, tzinfo=UTC)
    return frame.with_columns(
        source_updated_at=pl.lit(base) + pl.duration(seconds=pl.lit(offsets)),
    ).select(*(pl.col(c).cast(t) for c, t in _FRAME_SCHEMA.items()), "person_id")
