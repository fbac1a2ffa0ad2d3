"""Identity on what a list has: ids that are not US SSNs, parts of the model left out for lack of
data (and said so), a clear error naming the columns when too few are usable, and Splink's own
reason passed on without patient values."""

import re
from datetime import UTC, date, datetime
from typing import Any

import polars as pl
import pytest
from splink.internals.exceptions import EMTrainingException, SplinkException

from sandbox.population.people import generate_patient_frame
from schema import PATIENTS
from transforms import identity as idn
from transforms.identity.comparisons import BLOCKING_RULES, COMPARISONS, EM_RULES
from transforms.identity.features import FEATURE_COLUMNS, FEATURE_SOURCES
from transforms.identity.model import _engine_error
from transforms.identity.usable import Plan, _equalities, plan, side_stats

NOW = datetime(2025, 1, 1, tzinfo=UTC)
_NO_CONTACT = ("sex", "phone", "email")


def national_ids(frame: pl.DataFrame) -> pl.DataFrame:
    """The frame with each person's SSN replaced by a 7-digit id of that person (null stays null)."""
    ids = (
        frame.select("person_id")
        .unique()
        .sort("person_id")
        .with_columns(nid=(pl.int_range(pl.len()) * 7919 % 9_000_000 + 1_000_000).cast(pl.String))
    )
    return (
        frame.join(ids, on="person_id", how="left", maintain_order="left")
        .with_columns(ssn=pl.when(pl.col("ssn").is_not_null()).then(pl.col("nid")))
        .drop("nid")
    )


def blank(frame: pl.DataFrame, *columns: str) -> pl.DataFrame:
    return frame.with_columns(pl.lit(None, PATIENTS[c]).alias(c) for c in columns)


def row(surface: str, source_id: str, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(PATIENTS.names())
    out.update(source_surface=surface, source_id=source_id, identifiers=[], source_updated_at=NOW)
    out.update(fields)
    return out


def plan_of(left: pl.DataFrame, right: pl.DataFrame) -> Plan:
    lf, rf = (idn.features(f.lazy()).collect() for f in (left, right))
    return plan(side_stats(left, lf), side_stats(right, rf), lf, rf)


@pytest.fixture(scope="module")
def population() -> pl.DataFrame:
    return generate_patient_frame(1500, seed=11)


# -- ids that are not US SSNs ----------------------------------------------------------------------


def test_non_us_ids_are_kept_as_exact_identifiers_and_placeholders_dropped() -> None:
    values = {
        "931-22-4810": "931224810",  # a US SSN: its 9 digits
        "931 22 4810": "931224810",
        "4410221": "4410221",  # another country's 7-digit id
        " 44-10-221 ": "4410221",
        "ab 123456 c": "AB123456C",  # letters and digits (a UK NINO shape)
        "000-12-3456": None,  # never-issued SSN area
        "123-45-6789": None,  # the classic placeholder
        "0000000": None,  # one repeated digit
        "1234567": None,  # counting up from 1
        "UNKNOWN": None,  # no digit at all
        "12": None,  # too short to be an id
    }
    f = idn.features(
        pl.DataFrame([row("fhir", str(i), ssn=v) for i, v in enumerate(values)], schema=PATIENTS).lazy()
    ).collect()
    assert dict(zip(values, f["ssn"].to_list(), strict=True)) == values


def test_feature_sources_cover_every_feature() -> None:
    assert set(FEATURE_SOURCES) == set(FEATURE_COLUMNS)
    assert set(FEATURE_SOURCES.values()) <= set(PATIENTS.names())
    for rule in EM_RULES:  # the pair count before an EM session reads every rule as equalities
        assert _equalities(rule)


# -- the plan: what two lists can feed ------------------------------------------------------------


def test_a_column_empty_on_one_side_leaves_its_comparison_and_rules_out(population: pl.DataFrame) -> None:
    pats = population.drop("person_id")
    left = blank(pats.filter(pl.col("source_surface") == "fhir"), *_NO_CONTACT)
    right = blank(pats.filter(pl.col("source_surface") == "datamodel"), "sex")
    p = plan_of(left, right)
    kept = {c["output_column_name"] for c in p.comparisons}
    assert kept == {c["output_column_name"] for c in COMPARISONS} - set(_NO_CONTACT)
    assert "l.phone = r.phone" not in p.blocking_rules and "l.ssn = r.ssn" in p.blocking_rules
    assert p.em_rules == EM_RULES
    why = {(o["part"], o["name"]): o["reason"] for o in p.left_out}
    assert why[("comparison", "sex")] == "sex: empty on both sides"
    assert why[("comparison", "phone")] == "phone: empty on the left"
    assert why[("blocking rule", "l.email = r.email")] == "email: empty on the left"
    assert {o["part"] for o in p.left_out} == {"comparison", "blocking rule"}


def test_a_training_session_without_data_or_pairs_is_left_out(population: pl.DataFrame) -> None:
    pats = population.drop("person_id")
    left = pats.filter(pl.col("source_surface") == "fhir")
    right = pats.filter(pl.col("source_surface") == "datamodel")
    # No SSN on the right: the SSN session has no data there.
    p = plan_of(left, blank(right, "ssn"))
    assert "l.ssn = r.ssn" not in p.em_rules and len(p.em_rules) == len(EM_RULES) - 1
    session = next(o for o in p.left_out if o["part"] == "training session")
    assert session == {
        "part": "training session",
        "name": "l.ssn = r.ssn",
        "columns": ["ssn"],
        "reason": "ssn: empty on the right",
    }
    # SSNs on the left, 7-digit national ids on the right: both usable, but no pair agrees.
    p = plan_of(
        left, national_ids(population.filter(pl.col("source_surface") == "datamodel")).drop("person_id")
    )
    assert "ssn" in {c["output_column_name"] for c in p.comparisons}
    session = next(o for o in p.left_out if o["part"] == "training session")
    assert session["reason"] == "no pair of records agrees on ssn"
    # Values present but none usable (placeholders) are told apart from an empty column.
    p = plan_of(left, right.with_columns(ssn=pl.lit("000-00-0000")))
    reason = next(o["reason"] for o in p.left_out if o["name"] == "ssn")
    assert reason == f"ssn: no usable value on the right ({right.height:,} present, none valid)"


def test_too_few_usable_columns_is_an_error_naming_them() -> None:
    left = pl.DataFrame(
        [
            row("fhir", f"f{i}", given_name=g, family_name="Okafor", phone="+19185550147")
            for i, g in enumerate(["Ann", "Bo", "Cy"])
        ],
        schema=PATIENTS,
    )
    right = pl.DataFrame(
        [
            row("datamodel", f"d{i}", given_name=g, family_name="Okafor", email="a@example.org")
            for i, g in enumerate(["Ann", "Bo"])
        ],
        schema=PATIENTS,
    )
    with pytest.raises(idn.IdentityError) as err:
        plan_of(left, right)
    message = str(err.value)
    assert message.startswith("too few columns usable on both sides to link")
    assert "only 2 comparison(s) have data on both sides" in message
    assert "Usable on both sides: given_name, family_name." in message
    assert "birth_date: empty on both sides" in message
    assert "phone: empty on the right" in message and "email: empty on the left" in message
    assert "given_name, family_name and birth_date" in message  # what to do
    assert not [v for v in ("Ann", "Okafor", "9185550147", "a@example.org") if v in message]


# -- training and scoring on what a list has -------------------------------------------------------


@pytest.fixture(scope="module")
def sparse_model(population: pl.DataFrame) -> dict[str, Any]:
    """A model trained on lists with no sex, phone or email and 7-digit national ids for SSNs."""
    pats = blank(national_ids(population), *_NO_CONTACT).drop("person_id")
    return idn.train_model(*idn.split_surfaces(pats), seed=1)


def test_model_trained_without_columns_says_what_it_left_out(sparse_model: dict[str, Any]) -> None:
    names = {c["output_column_name"] for c in sparse_model["splink"]["comparisons"]}
    assert names.isdisjoint(_NO_CONTACT) and "ssn" in names
    rules = {r["blocking_rule"] for r in sparse_model["splink"]["blocking_rules_to_generate_predictions"]}
    assert rules == set(BLOCKING_RULES) - {"l.phone = r.phone", "l.email = r.email"}
    left_out = {(o["part"], o["name"]) for o in sparse_model["left_out"]}
    assert left_out == {
        ("comparison", "sex"),
        ("comparison", "phone"),
        ("comparison", "email"),
        ("blocking rule", "l.phone = r.phone"),
        ("blocking rule", "l.email = r.email"),
    }


def test_national_ids_link_exactly_and_never_by_one_edit(sparse_model: dict[str, Any]) -> None:
    base = row(
        "fhir",
        "f",
        given_name="Margaret",
        middle_name="Ann",
        family_name="Okafor",
        birth_date=date(1971, 4, 9),
        ssn="4410227",
        address_line="4410 Sycamore Dr",
        address_postal_code="74105",
    )
    for ssn, level in (("4410227", "exact"), ("4410228", "different"), ("4401227", "different")):
        other = dict(base, source_surface="datamodel", source_id="d", ssn=ssn)
        out = idn.score_pairs(
            pl.DataFrame([base], schema=PATIENTS),
            pl.DataFrame([other], schema=PATIENTS),
            sparse_model,
            min_match_weight=-1000,
        )
        levels = {e["comparison"]: e["level"] for e in out["evidence"][0]}
        assert levels["ssn"] == level, ssn
        assert set(levels).isdisjoint(_NO_CONTACT)
        assert ("ssn-differs" in out["flags"][0]) == (level == "different")
    # Two US SSNs keep their one-edit level: test_identity_model.test_realistic_noise_still_links.


def test_resolve_on_a_sparse_list_logs_what_it_left_out(
    population: pl.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    pats = blank(population.head(300), "sex").drop("person_id")
    with caplog.at_level("INFO", logger="transforms.identity.run"):
        result = idn.resolve(pats, now=NOW)
    assert result.model is not None
    assert "identity: comparison sex left out of the model: sex: empty on both sides" in caplog.messages


# -- Splink's reason, never a patient value --------------------------------------------------------


def test_splinks_own_reason_reaches_the_user() -> None:
    err = _engine_error(
        EMTrainingException(
            "Training rule `l.ssn = r.ssn` resulted in no record pairs.  This means that in the supplied "
            "data set there were no pairs of records for which `l.ssn = r.ssn` was `true`.\n"
            "Expectation maximisation requires a substantial number of record comparisons."
        )
    )
    assert str(err).startswith("identity matching failed in Splink (EMTrainingException): Training rule")
    assert "`l.ssn = r.ssn` resulted in no record pairs" in str(err)
    assert "\n" not in str(err)


def test_an_engine_message_that_may_quote_values_is_reduced_to_its_kind() -> None:
    try:
        try:
            raise ValueError("Conversion Error: Could not convert string 'Okafor' to INT32")
        except ValueError as inner:
            raise SplinkException("Error executing the following sql ... Error was: 'Okafor'") from inner
    except SplinkException as wrapped:
        err = _engine_error(wrapped)
    assert str(err) == "identity matching failed in DuckDB (ValueError)"
    assert re.search("okafor", str(err), re.IGNORECASE) is None
