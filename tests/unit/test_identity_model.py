"""The probabilistic pass: a Splink model trained on a small generated population, then used to
score hand-made pairs that exercise each comparison level and conflict rule."""

import json
import logging
from datetime import UTC, date, datetime
from typing import Any

import polars as pl
import pytest

from sandbox.population.people import generate_patient_frame
from schema import PATIENTS
from transforms import identity as idn

NOW = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def population() -> pl.DataFrame:
    return generate_patient_frame(1500, seed=11)


@pytest.fixture(scope="module")
def model(population: pl.DataFrame) -> dict[str, Any]:
    left, right = idn.split_surfaces(population.drop("person_id"))
    return idn.train_model(left, right, seed=1)


def person(surface: str, source_id: str, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict.fromkeys(PATIENTS.names())
    base.update(
        source_surface=surface,
        source_id=source_id,
        identifiers=[],
        given_name="Margaret",
        middle_name="Ann",
        family_name="Okafor",
        birth_date=date(1971, 4, 9),
        sex="female",
        ssn="931-22-4810",
        address_line="4410 Sycamore Dr",
        address_city="Tulsa",
        address_state="OK",
        address_postal_code="74105",
        phone="+19185550147",
        email="maggie.okafor@example.org",
        source_updated_at=NOW,
    )
    base.update(overrides)
    return base


def score(model: dict[str, Any], left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    lhs = pl.DataFrame([left], schema=PATIENTS)
    rhs = pl.DataFrame([right], schema=PATIENTS)
    out = idn.score_pairs(lhs, rhs, model, min_match_weight=-1000)
    assert out.height == 1, "the pair should be a blocking candidate"
    row = out.row(0, named=True)
    row["levels"] = {e["comparison"]: e["level"] for e in row["evidence"]}
    return row


def test_model_is_json_and_reproducible(population: pl.DataFrame, model: dict[str, Any]) -> None:
    text = json.dumps(model)
    assert json.loads(text) == model
    assert model["format"] == idn.MODEL_FORMAT
    left, right = idn.split_surfaces(population.drop("person_id"))
    assert json.dumps(idn.train_model(left, right, seed=1), sort_keys=True) == json.dumps(
        model, sort_keys=True
    )


def test_a_foreign_model_is_rejected(population: pl.DataFrame) -> None:
    left, right = idn.split_surfaces(population.drop("person_id"))
    with pytest.raises(ValueError, match="retrain"):
        idn.score_pairs(left, right, {"link_type": "link_only"})


def test_scored_pairs_carry_evidence_per_comparison(population: pl.DataFrame, model: dict[str, Any]) -> None:
    left, right = idn.split_surfaces(population.drop("person_id"))
    pairs = idn.score_pairs(left, right, model)
    assert pairs.schema == idn.PAIRS
    assert pairs.height > 0
    names = {e["comparison"] for e in pairs["evidence"][0]}
    assert names == {
        "given_name",
        "family_name",
        "middle_name",
        "birth_date",
        "sex",
        "ssn",
        "address",
        "phone",
        "email",
    }
    # Cross-surface only, and the left input always on the left.
    assert set(pairs["left_surface"]) == {"fhir"} and set(pairs["right_surface"]) == {"datamodel"}


def test_identical_records_link(model: dict[str, Any]) -> None:
    row = score(model, person("fhir", "f"), person("datamodel", "d"))
    assert row["match_probability"] > 0.999999 and row["flags"] == []


@pytest.mark.parametrize(
    ("change", "comparison", "level"),
    [
        ({"given_name": "Maggie"}, "given_name", "nickname"),
        ({"given_name": "Magie"}, "given_name", "nickname with a slip"),
        ({"given_name": "Margret"}, "given_name", "typo"),
        ({"given_name": "Okafor", "family_name": "Margaret"}, "given_name", "swapped"),
        ({"family_name": "Okafor-Bell"}, "family_name", "shared token"),
        ({"family_name": "Okafro"}, "family_name", "typo"),
        ({"birth_date": date(1971, 9, 4)}, "birth_date", "day-month swapped"),
        ({"birth_date": date(1971, 4, 8)}, "birth_date", "one edit"),
        ({"birth_date": date(1972, 4, 9)}, "birth_date", "one edit"),
        ({"ssn": "931-22-4811"}, "ssn", "one edit"),
        ({"ssn": None}, "ssn", "missing"),
        ({"address_line": "4410 Sycamore Drive"}, "address", "same address"),
        ({"address_line": "12 Elm St", "address_postal_code": "74105"}, "address", "same postal code"),
        ({"phone": None, "email": None}, "phone", "missing"),
    ],
)
def test_realistic_noise_still_links(
    model: dict[str, Any], change: dict[str, Any], comparison: str, level: str
) -> None:
    row = score(model, person("fhir", "f"), person("datamodel", "d", **change))
    assert row["levels"][comparison] == level
    assert row["flags"] == []
    assert row["match_probability"] >= idn.LINK_THRESHOLD


def test_twin_is_flagged_not_linked(model: dict[str, Any]) -> None:
    twin = person("datamodel", "d", given_name="Patricia", middle_name="Rose", ssn="944-10-2231", email=None)
    row = score(model, person("fhir", "f"), twin)
    assert "possible-relative" in row["flags"] and "ssn-differs" in row["flags"]
    twin_no_ssn = dict(twin, ssn=None, middle_name=None)
    row = score(model, person("fhir", "f", ssn=None), twin_no_ssn)
    assert row["flags"] == ["possible-relative"]
    links, _ = idn.decide(pl.DataFrame([{k: row[k] for k in idn.PAIRS.names()}], schema=idn.PAIRS), now=NOW)
    assert links.height == 0


def test_twin_sharing_middle_name_and_email_is_one_person(model: dict[str, Any]) -> None:
    # A given name recorded two ways (a legal name and the one in use), no SSN on the list: the
    # middle name and a personal email, which siblings do not share, tell it is one person.
    left = person("fhir", "f", ssn=None)
    row = score(model, left, person("datamodel", "d", given_name="Patricia", ssn=None))
    assert row["levels"]["given_name"] == "different" and row["flags"] == []
    # One of the two is not enough: twins can share a middle name, and a household an email.
    for change in ({"middle_name": "Rose"}, {"email": "p.okafor@example.org"}):
        row = score(model, left, person("datamodel", "d", given_name="Patricia", ssn=None, **change))
        assert row["flags"] == ["possible-relative"], change


def _no_contact(surface: str, source_id: str, **overrides: Any) -> dict[str, Any]:
    blank: dict[str, Any] = {"ssn": None, "phone": None, "email": None, "middle_name": None}
    return person(surface, source_id, **{**blank, **overrides})


def test_a_move_within_town_corroborates_when_nothing_else_can(model: dict[str, Any]) -> None:
    # A list with no SSN, phone, email or middle name: the same 3-digit ZIP area is the only trace of
    # a person who moved across town.
    moved = _no_contact("datamodel", "d", address_line="12 Elm St", address_postal_code="74119")
    row = score(model, _no_contact("fhir", "f"), moved)
    assert row["levels"]["address"] == "same area"
    assert row["flags"] == []


@pytest.mark.parametrize(
    "differs", [{"middle_name": "Louise"}, {"sex": "male"}, {"ssn": "955-61-0042"}, {"phone": "+19185550199"}]
)
def test_same_area_does_not_corroborate_a_pair_that_differs_on_something_personal(
    model: dict[str, Any], differs: dict[str, Any]
) -> None:
    # A same-name, same-birth-date stranger across town: something personal disagrees.
    left = _no_contact("fhir", "f", **{field: person("fhir", "f")[field] for field in differs})
    stranger = _no_contact("datamodel", "d", address_line="12 Elm St", address_postal_code="74119", **differs)
    row = score(model, left, stranger)
    assert row["levels"]["address"] == "same area"
    assert "uncorroborated" in row["flags"]


def _moved_without_ssn_or_middle(model: dict[str, Any], *, others: int, **changes: Any) -> dict[str, Any]:
    """Score a person who moved out of town and whose two records lack the SSN and the middle name
    (no phone or email on the list), among ``others`` people per list who have both."""
    fillers: list[dict[str, Any]] = [
        dict(
            given_name=given,
            middle_name=middle,
            family_name=family,
            birth_date=date(1950 + 7 * i, 1 + i, 2 + i),
            ssn=f"91{i}-3{i}-567{i}",
            address_line=f"{100 + i} Birch Ln",
            address_postal_code=f"6{i}101",
        )
        for i, (given, middle, family) in enumerate(
            [("Tobias", "Karl", "Lindqvist"), ("Ines", "Maria", "Duarte"), ("Kwame", "Kofi", "Mensah")][
                :others
            ]
        )
    ]
    left = [_no_contact("fhir", "f", **changes.get("left", {}))] + [
        _no_contact("fhir", f"f{i}", **f) for i, f in enumerate(fillers)
    ]
    moved = {"address_line": "88 Harbor Ct", "address_city": "Denver", "address_state": "CO"}
    right = [
        _no_contact("datamodel", "d", address_postal_code="80205", **moved, **changes.get("right", {}))
    ] + [_no_contact("datamodel", f"d{i}", **f) for i, f in enumerate(fillers)]
    out = idn.score_pairs(
        pl.DataFrame(left, schema=PATIENTS),
        pl.DataFrame(right, schema=PATIENTS),
        model,
        min_match_weight=-1000,
    ).filter((pl.col("left_id") == "f") & (pl.col("right_id") == "d"))
    assert out.height == 1, "the pair should be a blocking candidate"
    row = out.row(0, named=True)
    row["levels"] = {e["comparison"]: e["level"] for e in row["evidence"]}
    assert row["levels"]["address"] == "different"
    return row


def test_lacking_the_same_ssn_and_middle_name_corroborates_in_lists_that_record_them(
    model: dict[str, Any],
) -> None:
    # A person without an SSN or a middle name lacks them in every system; two strangers lack them
    # independently. In lists where most records hold both, the shared absence backs name and birth date.
    # (The score is this model's, trained with phones and emails; the rule under test is the flag.)
    assert _moved_without_ssn_or_middle(model, others=3)["flags"] == []


@pytest.mark.parametrize(
    ("others", "changes"),
    [
        # The SSN on one side only: a stranger who has one, or a record that lost it; nothing shared.
        (3, {"left": {"ssn": "931-22-4810"}}),
        (3, {"right": {"middle_name": "Ann"}}),
        # Something personal disagrees.
        (3, {"left": {"sex": "female"}, "right": {"sex": "male"}}),
        (3, {"left": {"phone": "+19185550147"}, "right": {"phone": "+13035550199"}}),
        # Lists that hold an SSN and a middle name for no more than half their records: absence says nothing.
        (0, {}),
        (1, {}),
    ],
)
def test_absence_does_not_corroborate_when_it_is_not_shared_or_says_nothing(
    model: dict[str, Any], others: int, changes: dict[str, dict[str, Any]]
) -> None:
    row = _moved_without_ssn_or_middle(model, others=others, **changes)
    assert "uncorroborated" in row["flags"]


def test_junior_and_senior_are_flagged(model: dict[str, Any]) -> None:
    junior = person("datamodel", "d", birth_date=date(1998, 11, 23), ssn=None, email=None)
    row = score(model, person("fhir", "f", email=None), junior)
    assert "dob-differs" in row["flags"]


def test_same_name_same_birth_date_stranger_does_not_link(model: dict[str, Any]) -> None:
    stranger = person(
        "datamodel",
        "d",
        middle_name="Louise",
        ssn="955-61-0042",
        address_line="88 Harbor Ct",
        address_city="Denver",
        address_state="CO",
        address_postal_code="80205",
        phone="+13035550199",
        email="margaret.okafor71@example.com",
    )
    row = score(model, person("fhir", "f"), stranger)
    assert row["match_probability"] < idn.REVIEW_THRESHOLD


def test_no_patient_values_in_logs_or_output(
    population: pl.DataFrame, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    sample = population.head(400).drop("person_id")
    with caplog.at_level(logging.DEBUG):
        idn.resolve(sample, now=NOW, seed=3)
    out, err = capfd.readouterr()
    text = "\n".join(r.getMessage() for r in caplog.records) + out + err
    values = set(sample["family_name"].drop_nulls()) | set(sample["ssn"].drop_nulls())
    values |= set(sample["birth_date"].drop_nulls().cast(pl.String))
    leaked = [v for v in values if v in text]
    assert leaked == []


def test_engine_errors_do_not_quote_patient_values(population: pl.DataFrame, model: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(model))
    middle = next(c for c in broken["splink"]["comparisons"] if c["output_column_name"] == "middle_name")
    middle["comparison_levels"][1]["sql_condition"] = "cast(middle_l AS INTEGER) = 1"  # fails on a name
    left, right = idn.split_surfaces(population.drop("person_id"))
    with pytest.raises(idn.IdentityError) as err:
        idn.score_pairs(left, right, broken)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert not [n for n in population["middle_name"].drop_nulls().unique() if n in str(err.value)]
