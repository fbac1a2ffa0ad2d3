"""Identity logic on small hand-made frames: identifiers, features, decisions, person keys, golden rows."""

from datetime import UTC, date, datetime, timedelta
from typing import Any

import polars as pl
import pytest

from schema import PATIENTS
from transforms import identity as idn
from transforms.identity.nicknames import FORMAL_NAMES, VARIANTS

NOW = datetime(2025, 1, 1, tzinfo=UTC)
ENT = "urn:oid:2.16.840.1.113883.3.4242.1"


def patient(surface: str, source_id: str, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(PATIENTS.names())
    row.update(source_surface=surface, source_id=source_id, identifiers=[])
    row["source_updated_at"] = NOW - timedelta(days=30)
    row.update(fields)
    return row


def frame(*rows: dict[str, Any]) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=PATIENTS)


def pair(
    left: str, right: str, probability: float, *, method: str = "probabilistic", **kw: Any
) -> dict[str, Any]:
    import math

    weight = math.log2(probability / (1 - probability)) if 0 < probability < 1 else None
    return {
        "left_surface": "fhir",
        "left_id": left,
        "right_surface": "datamodel",
        "right_id": right,
        "method": method,
        "match_weight": kw.get("match_weight", weight),
        "match_probability": probability,
        "evidence": [],
        "flags": kw.get("flags", []),
    }


def pairs(*rows: dict[str, Any]) -> pl.DataFrame:
    base = pl.DataFrame(list(rows), schema={k: v for k, v in idn.PAIRS.items() if k != "pair_id"})
    return base.with_columns(pair_id=idn.pair_id()).select(idn.PAIRS.names())


# -- deterministic pass ----------------------------------------------------------------------------


def test_enterprise_identifier_links_across_oid_spellings() -> None:
    left = frame(patient("fhir", "f1", identifiers=[{"system": ENT, "value": "E1"}]))
    right = frame(
        patient("datamodel", "d1", identifiers=[{"system": " 2.16.840.1.113883.3.4242.1 ", "value": "E1 "}])
    )
    out = idn.deterministic_links(left.lazy(), right.lazy()).collect()
    assert out.select("left_id", "right_id", "method", "match_probability").rows() == [
        ("f1", "d1", f"identifier:{ENT}", 1.0)
    ]
    assert out.schema == idn.PAIRS


def test_same_value_in_other_systems_never_links() -> None:
    # A decoy: the Data Model MRN value equals the FHIR MRN value, and the local MRN systems differ.
    left = frame(patient("fhir", "f1", identifiers=[{"system": "urn:redox:fhir-ehr:MR", "value": "123"}]))
    right = frame(
        patient(
            "datamodel",
            "d1",
            identifiers=[
                {"system": "urn:redox:dm:MR", "value": "123"},
                {"system": ENT, "value": "123"},
            ],
        )
    )
    assert idn.deterministic_links(left.lazy(), right.lazy()).collect().height == 0


def test_local_systems_are_not_deterministic_even_when_equal() -> None:
    mrn = [{"system": "urn:redox:fhir-ehr:MR", "value": "123"}]
    left = frame(patient("fhir", "f1", identifiers=mrn))
    right = frame(patient("datamodel", "d1", identifiers=mrn))
    assert idn.deterministic_links(left.lazy(), right.lazy()).collect().height == 0
    # ...unless the organization declares the system shared.
    shared = idn.deterministic_links(left.lazy(), right.lazy(), systems=["urn:redox:fhir-ehr:MR"]).collect()
    assert shared.height == 1


def test_identifier_held_by_two_records_of_one_side_is_not_trusted() -> None:
    ent = [{"system": ENT, "value": "E1"}]
    left = frame(patient("fhir", "f1", identifiers=ent), patient("fhir", "f2", identifiers=ent))
    right = frame(patient("datamodel", "d1", identifiers=ent))
    assert idn.deterministic_links(left.lazy(), right.lazy()).collect().height == 0


def test_normalize_system() -> None:
    systems = pl.DataFrame({"s": ["URN:OID:1.2.3", "1.2.3", " http://X/y ", "", None]})
    out = systems.select(idn.normalize_system(pl.col("s"))).to_series()
    assert out.to_list() == ["urn:oid:1.2.3", "urn:oid:1.2.3", "http://x/y", None, None]


# -- features --------------------------------------------------------------------------------------


def test_features_fold_names_and_group_nicknames() -> None:
    f = idn.features(
        frame(
            patient(
                "fhir",
                "f1",
                given_name="Bob",
                family_name="Smith-Jones",
                birth_date=date(1980, 3, 7),
                ssn="912-34-5678",
                phone="+1 (608) 555-0101",
                address_line="12 North Main Street, #4",
                address_postal_code="53703-1234",
                email=" Bob@Example.ORG ",
            ),
            patient("datamodel", "d1", given_name="José", family_name="De La Cruz", ssn="000-12-3456"),
            patient("datamodel", "d2", ssn="123-45-6789"),
        ).lazy()
    ).collect()
    bob, jose = f.row(0, named=True), f.row(1, named=True)
    assert bob["given"] == "bob" and "robert" in bob["given_formal"]
    assert bob["given_sx"] == "r163"  # blocks with Robert
    assert bob["family"] == "smithjones" and bob["family_tokens"] == ["jones", "smith"]
    assert (bob["dob"], bob["dob_key"]) == ("1980-03-07", "1980-3-7")
    assert (bob["ssn"], bob["phone"], bob["zip5"]) == ("912345678", "6085550101", "53703")
    assert bob["addr"] == "12 n main st apt 4"
    assert bob["email"] == "bob@example.org"
    assert jose["given"] == "jose"
    assert jose["family"] == "delacruz" and jose["family_tokens"] == ["cruz"]
    assert jose["ssn"] is None  # area 000 is never issued
    assert f.row(2, named=True)["ssn"] is None  # the classic placeholder


def test_transposed_birth_date_shares_blocking_key() -> None:
    f = idn.features(
        frame(
            patient("fhir", "a", birth_date=date(1990, 4, 11)),
            patient("fhir", "b", birth_date=date(1990, 11, 4)),
        ).lazy()
    ).collect()
    assert f["dob_key"].n_unique() == 1


def test_nickname_tables_are_consistent() -> None:
    for name, formals in FORMAL_NAMES.items():
        assert name.isalpha() and name.islower()
        assert all(f in FORMAL_NAMES and f in FORMAL_NAMES[f] for f in formals)
        assert name in VARIANTS[name]
    assert "robert" in FORMAL_NAMES["bob"]
    assert set(FORMAL_NAMES["albert"]) & set(FORMAL_NAMES["al"])
    assert not set(FORMAL_NAMES["albert"]) & set(FORMAL_NAMES["alfred"])


# -- decisions -------------------------------------------------------------------------------------


def test_thresholds_split_links_and_review() -> None:
    links, review = idn.decide(
        pairs(pair("f1", "d1", 0.9999), pair("f2", "d2", 0.5), pair("f3", "d3", 0.01)),
        now=NOW,
        link_threshold=0.99,
        review_threshold=0.2,
    )
    assert links["left_id"].to_list() == ["f1"]
    assert review["left_id"].to_list() == ["f2"]
    assert review.schema == idn.IDENTITY_REVIEW
    assert review.row(0, named=True)["reason"] == "between thresholds"
    assert review.row(0, named=True)["status"] == "pending"


def test_flagged_pairs_never_link_automatically() -> None:
    links, review = idn.decide(
        pairs(
            pair("f1", "d1", 0.999999, flags=["possible-relative"]),
            pair("f2", "d2", 0.99999, flags=["ssn-differs"]),
        ),
        now=NOW,
    )
    assert links.height == 0
    assert sorted(review["reason"].to_list()) == ["possible-relative", "ssn-differs"]


def test_one_to_one_keeps_the_best_candidate() -> None:
    links, review = idn.decide(
        pairs(pair("f1", "d1", 0.9999999), pair("f1", "d2", 0.999), pair("f2", "d2", 0.9999)),
        now=NOW,
        ambiguity_margin=0.0,
    )
    assert sorted(zip(links["left_id"], links["right_id"], strict=True)) == [("f1", "d1"), ("f2", "d2")]
    assert review.height == 0  # the loser's records are both linked already


def test_close_runner_up_makes_both_ambiguous() -> None:
    links, review = idn.decide(
        pairs(pair("f1", "d1", 0.99999), pair("f1", "d2", 0.99998)), now=NOW, ambiguity_margin=3.0
    )
    assert links.height == 0
    assert set(review["reason"]) == {"ambiguous"}


def test_identifier_link_beats_a_score_and_keeps_the_evidence() -> None:
    scored = pair("f1", "d1", 0.3)
    scored["evidence"] = [{"comparison": "ssn", "level": "exact", "match_weight": 9.0}]
    links, _ = idn.decide(
        pairs(scored, pair("f1", "d1", 1.0, method=f"identifier:{ENT}"), pair("f1", "d9", 0.99999)), now=NOW
    )
    assert links.select("left_id", "right_id", "method").rows() == [("f1", "d1", f"identifier:{ENT}")]
    assert links["evidence"].to_list()[0][0]["comparison"] == "ssn"


def decisions(*rows: tuple[str, str, str, datetime]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "left_surface": "fhir",
                "left_id": left,
                "right_surface": "datamodel",
                "right_id": right,
                "decision": decision,
                "decided_by": "reviewer@example.org",
                "decided_at": at,
                "note": None,
            }
            for left, right, decision, at in rows
        ],
        schema=idn.IDENTITY_DECISIONS,
    )


def test_recorded_decisions_are_honoured() -> None:
    candidates = pairs(pair("f1", "d1", 0.99999), pair("f2", "d2", 0.5), pair("f3", "d3", 0.5))
    recorded = decisions(
        ("f1", "d1", "no-link", NOW - timedelta(days=2)),
        ("f2", "d2", "no-link", NOW - timedelta(days=3)),
        ("f2", "d2", "link", NOW - timedelta(days=1)),  # the latest decision wins
        ("f7", "d7", "link", NOW - timedelta(days=1)),  # a pair no rule found
    )
    links, review = idn.decide(candidates, now=NOW, decisions=recorded)
    assert sorted(links.select("left_id", "method").rows()) == [("f2", "decision"), ("f7", "decision")]
    assert review["left_id"].to_list() == ["f3"]


def test_decision_matches_a_pair_recorded_the_other_way_round() -> None:
    recorded = pl.DataFrame(
        [
            {
                "left_surface": "datamodel",
                "left_id": "d1",
                "right_surface": "fhir",
                "right_id": "f1",
                "decision": "no-link",
                "decided_by": "r",
                "decided_at": NOW,
                "note": None,
            }
        ],
        schema=idn.IDENTITY_DECISIONS,
    )
    links, review = idn.decide(pairs(pair("f1", "d1", 0.99999)), now=NOW, decisions=recorded)
    assert links.height == 0 and review.height == 0


def test_bad_decision_value_is_rejected_without_record_values() -> None:
    bad = decisions(("f1", "d1", "maybe", NOW))
    with pytest.raises(ValueError, match="neither") as err:
        idn.decide(pairs(pair("f1", "d1", 0.5)), now=NOW, decisions=bad)
    assert "f1" not in str(err.value)


# -- persons ---------------------------------------------------------------------------------------


def records(*ids: tuple[str, str]) -> pl.DataFrame:
    return pl.DataFrame({"source_surface": [s for s, _ in ids], "source_id": [i for _, i in ids]})


def link_rows(*ends: tuple[str, str]) -> pl.DataFrame:
    return pairs(*(pair(a, b, 0.99999) for a, b in ends))


def keys(crosswalk: pl.DataFrame) -> dict[str, str]:
    return dict(zip(crosswalk["source_id"], crosswalk["person_key"], strict=True))


def test_first_run_creates_one_person_per_component() -> None:
    recs = records(("fhir", "f1"), ("datamodel", "d1"), ("fhir", "f2"))
    crosswalk, history = idn.cluster(recs, link_rows(("f1", "d1")), now=NOW)
    k = keys(crosswalk)
    assert k["f1"] == k["d1"] != k["f2"]
    assert crosswalk.schema == idn.PERSON_CROSSWALK and history.schema == idn.PERSON_HISTORY
    assert sorted(history["event"]) == ["create", "create"]
    assert set(crosswalk.filter(pl.col("source_id") == "f2")["method"]) == {"singleton"}
    assert all(key.startswith("psn_") for key in k.values())
    # Opaque: the key does not spell the source id.
    assert not any(sid in key for sid, key in k.items())


def test_rerun_with_new_records_keeps_every_key() -> None:
    recs = records(("fhir", "f1"), ("datamodel", "d1"), ("fhir", "f2"))
    first, _ = idn.cluster(recs, link_rows(("f1", "d1")), now=NOW)
    later = NOW + timedelta(days=1)
    more = pl.concat([recs, records(("datamodel", "d2"), ("fhir", "f3"))])
    second, history = idn.cluster(more, link_rows(("f1", "d1"), ("f2", "d2")), first, now=later)
    k1, k2 = keys(first), keys(second)
    assert all(k2[sid] == key for sid, key in k1.items())
    assert k2["d2"] == k1["f2"]  # joined the existing person
    assert history.select("event").to_series().to_list() == ["create"]  # only f3 is new
    # linked_at keeps the original time for records that did not move.
    assert second.filter(pl.col("source_id") == "f1")["linked_at"].item() == NOW
    assert second.filter(pl.col("source_id") == "d2")["linked_at"].item() == later


def test_merge_keeps_the_older_key_and_records_it() -> None:
    recs = records(("fhir", "f1"), ("datamodel", "d1"))
    first, _ = idn.cluster(recs.head(1), link_rows(), now=NOW)
    second, _ = idn.cluster(recs, link_rows(), first, now=NOW + timedelta(days=1))
    older, newer = keys(second)["f1"], keys(second)["d1"]
    third, history = idn.cluster(recs, link_rows(("f1", "d1")), second, now=NOW + timedelta(days=2))
    assert set(keys(third).values()) == {older}
    assert history.select("event", "person_key", "other_person_key").rows() == [("merge", older, newer)]


def test_split_gives_the_split_off_part_a_new_key() -> None:
    recs = records(("fhir", "f1"), ("datamodel", "d1"))
    first, _ = idn.cluster(recs, link_rows(("f1", "d1")), now=NOW)
    original = keys(first)["f1"]
    second, history = idn.cluster(recs, link_rows(), first, now=NOW + timedelta(days=1))
    k = keys(second)
    assert original in k.values() and k["f1"] != k["d1"]
    split_key = k["d1"] if k["f1"] == original else k["f1"]
    assert history.select("event", "person_key", "other_person_key").rows() == [
        ("split", split_key, original)
    ]


def test_retired_keys_are_never_reissued() -> None:
    recs = records(("fhir", "f1"), ("datamodel", "d1"))
    a, h1 = idn.cluster(recs, link_rows(), now=NOW)
    b, h2 = idn.cluster(recs, link_rows(("f1", "d1")), a, now=NOW + timedelta(days=1))
    retired = h2.filter(pl.col("event") == "merge")["other_person_key"].item()
    history = pl.concat([h1, h2])
    c, _ = idn.cluster(recs, link_rows(), b, now=NOW + timedelta(days=2), previous_history=history)
    assert retired not in set(c["person_key"])


def test_records_absent_from_a_run_keep_their_row() -> None:
    recs = records(("fhir", "f1"), ("datamodel", "d1"))
    first, _ = idn.cluster(recs, link_rows(("f1", "d1")), now=NOW)
    second, history = idn.cluster(recs.head(1), link_rows(), first, now=NOW + timedelta(days=1))
    assert keys(second) == keys(first) and history.height == 0


# -- golden records and evaluation -----------------------------------------------------------------


def test_golden_record_survivorship() -> None:
    old, new = NOW - timedelta(days=100), NOW - timedelta(days=1)
    pats = frame(
        patient(
            "fhir",
            "f1",
            given_name="Robert",
            family_name="Smith",
            sex="male",
            phone="+16085550101",
            address_line="1 Old Rd",
            address_city="Madison",
            address_postal_code="53703",
            identifiers=[{"system": ENT, "value": "E1"}],
            source_updated_at=old,
        ),
        patient(
            "datamodel",
            "d1",
            given_name="Bob",
            family_name=None,
            sex="unknown",
            phone=None,
            address_line="9 New St",
            address_city=None,
            address_postal_code="53711",
            identifiers=[{"system": "2.16.840.1.113883.3.4242.1", "value": "E1"}],
            source_updated_at=new,
        ),
    )
    crosswalk, _ = idn.cluster(pats, link_rows(("f1", "d1")), now=NOW)
    golden = idn.golden_records(pats, crosswalk)
    assert golden.schema == idn.PERSONS and golden.height == 1
    row = golden.row(0, named=True)
    assert row["given_name"] == "Bob"  # most recent
    assert row["family_name"] == "Smith"  # most recent that has one
    assert row["sex"] == "male"  # 'unknown' does not override a known value
    assert row["phone"] == "+16085550101"
    # The address is taken whole from one record: no old city with a new street.
    assert (row["address_line"], row["address_city"], row["address_postal_code"]) == (
        "9 New St",
        None,
        "53711",
    )
    assert row["identifiers"] == [{"system": ENT, "value": "E1"}]
    assert row["record_count"] == 2 and row["surfaces"] == ["datamodel", "fhir"]


def test_latest_version_of_a_record_is_used() -> None:
    pats = frame(
        patient("fhir", "f1", given_name="Old", source_updated_at=NOW - timedelta(days=9)),
        patient("fhir", "f1", given_name="New", source_updated_at=NOW - timedelta(days=1)),
    )
    crosswalk, _ = idn.cluster(pats, link_rows(), now=NOW)
    assert crosswalk.height == 1
    assert idn.golden_records(pats, crosswalk)["given_name"].to_list() == ["New"]


def test_evaluate_counts_cross_surface_pairs() -> None:
    crosswalk = pl.DataFrame(
        {
            "person_key": ["A", "A", "B", "C", "C"],
            "source_surface": ["fhir", "datamodel", "fhir", "datamodel", "fhir"],
            "source_id": ["f1", "d1", "f2", "d2", "f3"],
        }
    )
    truth = pl.DataFrame(
        {
            "person_id": ["P1", "P1", "P2", "P2", "P3"],
            "surface": ["fhir", "datamodel", "fhir", "datamodel", "fhir"],
            "source_patient_id": ["f1", "d1", "f2", "d2", "f3"],
        }
    )
    m = idn.evaluate(crosswalk, truth)
    assert (m["true_positives"], m["false_positives"], m["false_negatives"]) == (1, 1, 1)
    assert m["precision"] == 0.5 and m["recall"] == 0.5
    assert m["false_merge_persons"] == 1


def test_one_surface_only_makes_singletons() -> None:
    pats = frame(patient("fhir", "f1", given_name="Ann"), patient("fhir", "f2", given_name="Bo"))
    result = idn.resolve(pats, now=NOW)
    assert result.model is None and result.links.height == 0
    assert result.crosswalk["person_key"].n_unique() == 2


def test_too_few_records_to_train_still_link_on_identifiers() -> None:
    shared = [{"system": ENT, "value": "E1"}]
    pats = frame(
        patient("fhir", "f1", given_name="Ann", family_name="Lee", identifiers=shared),
        patient("datamodel", "d1", given_name="Ann", family_name="Lee", identifiers=shared),
        patient("datamodel", "d2", given_name="Bo", family_name="Ng"),
    )
    # Three records give EM nothing to estimate: a first sync of one day must not fail on it.
    result = idn.resolve(pats, now=NOW)
    assert result.model is None
    assert result.links.select("method").to_series().to_list() == [f"identifier:{ENT}"]
    assert result.crosswalk["person_key"].n_unique() == 2
