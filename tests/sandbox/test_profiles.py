"""Population profiles land the daily volumes docs/sandbox.md states, per surface."""

from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from sandbox.population.profiles import DEFAULT_RATES, PROFILES, Rates
from sandbox.population.world import PopulationConfig, build

START = date(2026, 3, 2)
TIME = {"encounters": "start_at", "results": "effective_at", "appointments": "start_at"}


def _one_day(profile: str, days: int) -> dict[str, dict[str, int]]:
    """Per surface: the middle day's encounters, results, appointments and distinct patients."""
    world = build(
        PopulationConfig(seed=7, profile=profile, start=START, end=START + timedelta(days=days - 1))
    )
    truth = world.truth()
    lo = datetime.combine(START + timedelta(days=days // 2), datetime.min.time(), UTC)
    hi = lo + timedelta(days=1)
    out: dict[str, dict[str, int]] = {}
    for surface in ("fhir", "datamodel"):
        patients: set[str] = set()
        counts = {}
        for table, column in TIME.items():
            rows = truth[table].filter(
                (pl.col("source_surface") == surface) & pl.col(column).is_between(lo, hi, closed="left")
            )
            counts[table] = rows.height
            patients |= set(rows["patient_source_id"].to_list())
        counts["patients"] = len(patients)
        out[surface] = counts
    assert len(world.persons) == PROFILES[profile].persons
    return out


def test_no_profile_keeps_the_rates_the_world_always_had():
    assert PopulationConfig().rates == DEFAULT_RATES == Rates(3.0, 1.5, 1, 3.0)
    assert PopulationConfig(patients=123).resolved().patients == 123
    assert PopulationConfig(patients=123, profile="clinic").resolved().patients == 15_000


def test_unknown_profile_is_refused():
    with pytest.raises(ValueError, match="known: clinic, hospital"):
        PopulationConfig(profile="spa").resolved()


def test_clinic_day():
    for counts in _one_day("clinic", 3).values():
        assert 90 <= counts["encounters"] <= 200
        assert 250 <= counts["results"] <= 800
        assert 90 <= counts["appointments"] <= 200
        assert 200 <= counts["patients"] <= 450


def test_hospital_day():
    """'One day of Results is tens of thousands of records', for 1,000-1,500 distinct patients."""
    for counts in _one_day("hospital", 1).values():
        assert 400 <= counts["encounters"] <= 650
        assert 15_000 <= counts["results"] <= 30_000
        assert 250 <= counts["appointments"] <= 450
        assert 1_000 <= counts["patients"] <= 1_800
