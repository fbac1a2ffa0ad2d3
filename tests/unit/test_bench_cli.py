"""The benchmark commands import and parse their options; no benchmark runs and nothing is timed."""

import datetime as dt
import importlib

import polars as pl
import pytest

from bench import __main__ as dispatch


@pytest.mark.parametrize("name", ["requests", "e2e"])
def test_listed_and_importable(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch.main(["--help"]) == 0
    assert name in capsys.readouterr().out
    module = importlib.import_module(f"bench.{name}")
    assert callable(module.main)


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("requests", ["--patients", "50", "--days", "2", "--recent", "1", "--page-size", "1000"]),
        ("e2e", ["--patients", "50", "--days", "2", "--repeat", "1", "--backfill-days", "2"]),
    ],
)
def test_help_and_options(name: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in argv[::2]:
        assert option in out


def test_requests_refuses_more_recent_days_than_the_window() -> None:
    from bench import requests

    with pytest.raises(SystemExit) as exit_:
        requests.main(["--days", "2", "--recent", "3"])
    assert exit_.value.code == 2


def test_requests_floors_from_a_small_truth() -> None:
    from bench.requests import MAX_COUNT, floors

    first = dt.date(2026, 1, 1)
    last = first + dt.timedelta(days=1)
    at = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
    day2 = at + dt.timedelta(days=1)

    def clinical(column: str, rows: list[tuple[str, str, dt.datetime]]) -> pl.DataFrame:
        return pl.DataFrame(
            rows,
            schema={
                "source_surface": pl.String(),
                "patient_source_id": pl.String(),
                column: pl.Datetime("us", "UTC"),
            },
            orient="row",
        )

    truth = {
        # FHIR: 1,001 encounters on day 1 (two pages), none on day 2 (still one request).
        "encounters": clinical(
            "start_at",
            [("fhir", f"p{i % 3}", at) for i in range(MAX_COUNT + 1)] + [("datamodel", "d1", at)],
        ),
        # Data Model: d1 has a visit on day 1 but only results on day 2; d2 only results.
        "results": clinical(
            "effective_at", [("datamodel", "d1", day2), ("datamodel", "d2", at), ("fhir", "p3", day2)]
        ),
        "appointments": clinical("start_at", []),
    }
    got = floors(truth, first, last)
    assert got["fhir Encounter"] == (MAX_COUNT + 1, 3, 2)
    assert got["fhir Observation"] == (1, 2, 1)
    assert got["fhir Appointment"] == (0, 2, 1)
    # p0..p2 first seen on day 1, p3 on day 2: one request each day, one for the whole window.
    assert got["fhir Patient"] == (4, 2, 1)
    assert got["datamodel Results.Query"] == (2, 2, 1)
    # Per partition d1 (day 2) and d2 need a search; over the window only d2 does.
    assert got["datamodel PatientSearch.Query"] == (2, 2, 1)
