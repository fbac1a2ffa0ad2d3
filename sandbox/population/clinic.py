"""The clinic: encounters, lab orders with their results, and appointments, made in vectorized
batches for given owners (surface, patient) and times, with the visit, order and provider ids they
carry.

Invariants: clinic-hour slots are drawn in the FHIR EHR's local zone and returned as UTC epoch
seconds; a record's ``updated`` time is never after its batch's ``now``; visit and order numbers
come from the seed's id maps, so they never repeat within a surface.
"""

import math
import random
from collections.abc import Sequence
from datetime import datetime
from typing import Final
from zoneinfo import ZoneInfo

import polars as pl

from sandbox import names
from sandbox.population.draws import Vec
from sandbox.population.epoch import DAY, EPOCH_ORDINAL
from sandbox.population.ids import Ids
from sandbox.population.pools import FEMALE, MALE, SIMPLE_FAMILY

_CLASS_WEIGHTS: Final = {"ambulatory": 65, "emergency": 10, "inpatient": 7, "observation": 5, "virtual": 13}
_DURATIONS: Final = (15, 20, 30, 45, 60)
_DURATION_WEIGHTS: Final = (2, 2, 4, 1, 1)


_ANALYTES: Final[dict[str, names.Analyte]] = {
    a[0]: a  # type: ignore[misc]
    for panel in names.PANELS.values()
    for a in panel
    if len(a) == 10
}


# Result shapes beyond a number or a string (see ``Clinic.orders``).
SNOMED: Final = "http://snomed.info/sct"
QUALITATIVE: Final = {"Positive": "10828004", "Negative": "260385009"}
BOOLEAN_ANALYTE: Final = "5802-4"
BP_EVERY: Final = 4
BP_PANEL: Final = ("85354-9", "Blood pressure panel with all children optional")
BP_PARTS: Final = (
    ("8480-6", "Systolic blood pressure", "systolic"),
    ("8462-4", "Diastolic blood pressure", "diastolic"),
)
BP_UNIT: Final = "mm[Hg]"
COMPONENTS: Final = pl.List(
    pl.Struct({"code": pl.String(), "display": pl.String(), "value_num": pl.Float64(), "unit": pl.String()})
)

CLASSES: Final = tuple(_CLASS_WEIGHTS)
_AMBULATORY: Final = CLASSES.index("ambulatory")
_VIRTUAL: Final = CLASSES.index("virtual")


def _flat(options: dict[str, tuple[object, ...]]) -> tuple[list[object], list[int], list[int]]:
    """Per-class option lists flattened: values, and each class's (offset, count) by class index."""
    values: list[object] = []
    offsets, counts = [], []
    for klass in CLASSES:
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


class Clinic:
    """Makes clinical records in batches (polars columns, then record objects), and the identifiers
    they carry. A batch is described by its owners (surface, patient) and per-row time inputs."""

    def __init__(self, ids: Ids, tz: ZoneInfo, seed: int) -> None:
        self.ids = ids
        self.tz = tz
        self._offsets: dict[int, int] = {}
        self.counter = {"encounters": 0, "appointments": 0, "fhir": 0, "datamodel": 0}
        prng = random.Random(f"redox-sandbox:{seed}:providers")
        self.provider_ids = [f"1{ids.npi(i):09d}" for i in range(150)]
        self.provider_names = [
            f"{prng.choice(MALE if prng.random() < 0.5 else FEMALE)} {prng.choice(SIMPLE_FAMILY)}"
            for _ in range(150)
        ]
        self.analytes = _analyte_table()

    def offset(self, day: int) -> int:
        """Seconds the EHR's zone is ahead of UTC at noon on ``day`` (days since 1970-01-01)."""
        off = self._offsets.get(day)
        if off is None:
            noon = datetime.fromordinal(day + EPOCH_ORDINAL).replace(hour=12, tzinfo=self.tz)
            delta = noon.utcoffset()
            off = self._offsets[day] = int(delta.total_seconds()) if delta else 0
        return off

    def slots(self, v: Vec, lo: pl.Series, hi: pl.Series) -> pl.Series:
        """Quarter-hour slots in clinic hours (08:00-16:45 local) in [lo, hi) per row. Draws outside
        the window are redrawn a few times, then clamped (only windows shorter than a day get that)."""
        m = lo.len()
        frame = pl.DataFrame({"lo": lo, "hi": hi, "t": pl.Series([None] * m, dtype=pl.Int64)})
        first_day = frame.select((pl.col("lo") // DAY - 1).min()).item() or 0
        last_day = frame.select((pl.col("hi") // DAY + 1).max()).item() or 0
        offsets = {d: self.offset(d) for d in range(first_day, last_day + 1)}
        for _ in range(6):
            day = (
                pl.col("lo") // DAY
                - 1
                + (pl.lit(v.u(m)) * (pl.col("hi") // DAY - pl.col("lo") // DAY + 3)).floor()
            )
            day = day.cast(pl.Int64)
            draw = day * DAY + 8 * 3600 + 900 * (pl.lit(v.u(m)) * 36).floor().cast(pl.Int64)
            draw = draw - day.replace_strict(offsets, return_dtype=pl.Int64, default=0)
            bad = pl.col("t").is_null() | (pl.col("t") < pl.col("lo")) | (pl.col("t") >= pl.col("hi"))
            frame = frame.with_columns(t=pl.when(bad).then(draw).otherwise("t"))
        return frame.select(
            pl.col("t").clip(pl.col("lo"), pl.max_horizontal("lo", pl.col("hi") - 1))
        ).to_series()

    def _provider(self, v: Vec, m: int) -> pl.Series:
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
        v: Vec,
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
            pl.when(k == CLASSES.index("ambulatory"))
            .then(_pick((15, 20, 30, 40, 60), (ud * 5).floor().cast(pl.Int64), pl.Int64()))
            .when(k == CLASSES.index("virtual"))
            .then(_pick((10, 15, 20, 30), (ud * 4).floor().cast(pl.Int64), pl.Int64()))
            .when(k == CLASSES.index("emergency"))
            .then(120 + (ud * 481).floor().cast(pl.Int64))
            .when(k == CLASSES.index("observation"))
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
            .then(pl.col("end") + 3600 + (uu * 2 * DAY).floor().cast(pl.Int64))
            .otherwise(pl.col("end") + 300 + (uu * DAY).floor().cast(pl.Int64))
        )
        type_idx = _by_class(names.ENCOUNTER_TYPES, k, pl.col("u_type"))  # type: ignore[arg-type]
        return frame.select(
            "surface",
            source_id=pl.when(pl.col("surface") == "fhir").then("uuid").otherwise("visit"),
            patient_source_id="patient",
            encounter_class=_pick(CLASSES, k, pl.String()),
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
        v: Vec,
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
                    pl.col("effective") + 3600 + (pl.col("u_upd") * (DAY - 3600)).floor().cast(pl.Int64)
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
        text = pl.when(positive).then("abnormal_text").otherwise("normal_text")
        # FHIR EHRs code qualitative results (SNOMED CT), and send the nitrite dipstick as a
        # boolean; the Data Model sends them as strings.
        fhir_kind = (
            pl.when(~is_text)
            .then(pl.lit("quantity"))
            .when(pl.col("code") == BOOLEAN_ANALYTE)
            .then(pl.lit("boolean"))
            .otherwise(pl.lit("codeable_concept"))
        )
        value_type = (
            pl.when(is_fhir)
            .then(fhir_kind)
            .otherwise(pl.when(is_text).then(pl.lit("string")).otherwise(pl.lit("quantity")))
        )
        coded = value_type == "codeable_concept"
        snomed = text.replace_strict(QUALITATIVE, default=None, return_dtype=pl.String)
        value_text = pl.when(is_text).then(
            pl.when(value_type == "boolean")
            .then(pl.when(positive).then(pl.lit("true")).otherwise(pl.lit("false")))
            .otherwise(text)
        )
        results = rows.select(
            "surface",
            source_id=pl.when(is_fhir).then("uuid").otherwise(pl.format("{}|{}", "order_id", "code")),
            patient_source_id="patient",
            order_id="order_id",
            code="code",
            code_system=pl.lit(names.LOINC),
            display="display",
            value_num="value",
            value_text=value_text,
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
            value_type=value_type,
            value_code=pl.when(coded).then(snomed),
            value_code_system=pl.when(coded).then(pl.lit(SNOMED)),
            value_code_display=pl.when(coded).then(text),
            components=pl.lit(None, dtype=COMPONENTS),
            updated="updated",
            preliminary="preliminary",
        )
        pressure = self._blood_pressure(orders, is_fhir).select(results.columns)
        return pl.concat([results, pressure], how="vertical_relaxed")

    @staticmethod
    def _blood_pressure(orders: pl.DataFrame, is_fhir: pl.Expr) -> pl.DataFrame:
        """A blood pressure taken with one order in ``BP_EVERY``: on FHIR one panel Observation
        whose systolic and diastolic are components; on the Data Model two plain numeric results.
        Values are a digest of the order id, not random draws, so every other draw is unchanged."""
        number = pl.col("order_id").cast(pl.Int64)
        taken = orders.filter(number % BP_EVERY == 0).with_columns(
            systolic=(100 + number % 53).cast(pl.Float64), diastolic=(60 + number % 31).cast(pl.Float64)
        )
        status = (
            pl.when("error")
            .then(pl.lit("entered-in-error"))
            .when("preliminary")
            .then(pl.lit("preliminary"))
            .otherwise(pl.lit("final"))
        )
        base = {
            "surface": pl.col("surface"),
            "patient_source_id": pl.col("patient"),
            "order_id": pl.col("order_id"),
            "code_system": pl.lit(names.LOINC),
            "reference_low": pl.lit(None, dtype=pl.Float64),
            "reference_high": pl.lit(None, dtype=pl.Float64),
            "reference_text": pl.lit(None, dtype=pl.String),
            "abnormal_flag": pl.lit(None, dtype=pl.String),
            "status": status,
            "effective_at": pl.col("effective"),
            "value_code": pl.lit(None, dtype=pl.String),
            "value_code_system": pl.lit(None, dtype=pl.String),
            "value_code_display": pl.lit(None, dtype=pl.String),
        }
        tail = {"updated": pl.col("updated"), "preliminary": pl.col("preliminary")}
        component = [
            pl.struct(
                code=pl.lit(code), display=pl.lit(display), value_num=pl.col(column), unit=pl.lit(BP_UNIT)
            )
            for code, display, column in BP_PARTS
        ]
        panel = taken.filter(is_fhir).select(
            source_id=pl.format("bp-{}", "order_id"),
            **base,
            code=pl.lit(BP_PANEL[0]),
            display=pl.lit(BP_PANEL[1]),
            value_num=pl.lit(None, dtype=pl.Float64),
            value_text=pl.lit(None, dtype=pl.String),
            unit=pl.lit(None, dtype=pl.String),
            value_type=pl.lit(None, dtype=pl.String),
            components=pl.concat_list(component),
            **tail,
        )
        parts = [
            taken.filter(~is_fhir).select(
                source_id=pl.format("{}|{}", "order_id", pl.lit(code)),
                **base,
                code=pl.lit(code),
                display=pl.lit(display),
                value_num=pl.col(column),
                value_text=pl.lit(None, dtype=pl.String),
                unit=pl.lit(BP_UNIT),
                value_type=pl.lit("quantity"),
                components=pl.lit(None, dtype=COMPONENTS),
                **tail,
            )
            for code, display, column in BP_PARTS
        ]
        return pl.concat([panel, *parts], how="diagonal_relaxed")

    def appointments(
        self,
        v: Vec,
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
        booked = pl.col("now") - 3600 - (pl.col("u_book") * 60 * DAY).floor().cast(pl.Int64)
        updated = (
            pl.when(fresh)
            .then("booked")
            .when(future & (st == "booked"))
            .then(booked)
            .when(future)
            .then(booked + 3600 + (uu * 5 * DAY).floor().cast(pl.Int64))
            .when(st == "fulfilled")
            .then(pl.col("start") + 60 * pl.col("duration") + (uu * DAY).floor().cast(pl.Int64))
            .when(st == "noshow")
            .then(pl.col("start") + 3600 + (uu * DAY).floor().cast(pl.Int64))
            .when(st == "cancelled")
            .then(pl.col("start") - 3600 - (uu * 14 * DAY).floor().cast(pl.Int64))
            .when(st == "arrived")
            .then(pl.col("start") + (uu * 900).floor().cast(pl.Int64))
            .otherwise(pl.col("start") + (uu * 3 * DAY).floor().cast(pl.Int64))
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
    def lab_value(rng: random.Random, code: str) -> tuple[float, str | None]:
        """A fresh value and its flag for analyte ``code`` (a corrected result's new value); a
        blood pressure part (sent without a flag) gets a plausible reading and no flag."""
        if code not in _ANALYTES:
            return float(round(rng.gauss(120.0 if code == BP_PARTS[0][0] else 80.0, 8.0))), None
        _, _, _, decimals, low, high, crit_low, crit_high, mean, sd = _ANALYTES[code]
        value = round(max(rng.gauss(mean, sd), 10.0**-decimals), decimals)
        if crit_low is not None and value < crit_low:
            return value, "critical_low"
        if crit_high is not None and value > crit_high:
            return value, "critical_high"
        if low > 0 and value < low:
            return value, "low"
        return value, "high" if value > high else "normal"
