"""Patient identity: link the same human across two patient sources and keep a stable ``person_key``.

The pipeline, each step a pure function on polars frames (Splink runs on a private in-memory DuckDB
connection and nothing else is opened):

1. ``deterministic_links`` — equal *shared* identifiers (``system|value`` normalized; an enterprise
   or MPI system on an allow-list). A bare value is never compared without its system, and a local
   MRN system belongs to one EHR so it cannot link two surfaces.
2. ``train_model`` / ``score_pairs`` — a Fellegi-Sunter model (Splink, trained without labels) scores
   candidate pairs from blocking rules and explains each score with per-comparison match weights.
3. ``decide`` — links above ``link_threshold``, queues the band down to ``review_threshold`` for a
   person, honours recorded decisions, refuses conflicting pairs (different SSNs, likely twins), and
   lets each record link at most one record of the other side.
4. ``cluster`` — turns links into persons, keeping every existing ``person_key``; merges and splits
   are written to ``person_history``.
5. ``golden_records`` — one row per person by documented survivorship rules (docs/identity.md).

Invariants kept here:
- a link always joins one record of the left input to one record of the right input, and each
  record has at most one link (a surface holds one record per person);
- a ``person_key`` once issued is never renumbered and never reissued: a merge keeps the older key
  and retires the other, a split gives the split-off part a new key;
- no value from a patient record (name, birth date, identifier, address, SSN) is logged or put into
  an exception message; Splink's own logging is held at WARNING while it runs.
"""

import contextlib
import dataclasses
import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, Final

import duckdb
import polars as pl

from schema import IDENTIFIER, NATURAL_KEY, PATIENTS, UTC_TS
from transforms.nicknames import FORMAL_NAMES, VARIANTS

MODEL_FORMAT: Final = "redox-etl-identity/1"

# Systems that are shared across EHRs and therefore safe for a deterministic link. The sandbox's
# enterprise MPI OID is the default; a real organization adds its own MPI system here (or passes
# ``systems=``). Local MRN systems must never be listed: an MRN is only unique within its EHR.
ENTERPRISE_SYSTEMS: Final[tuple[str, ...]] = ("urn:oid:2.16.840.1.113883.3.4242.1",)

# Match-probability thresholds (see docs/identity.md for how they were chosen).
LINK_THRESHOLD: Final = 0.99
REVIEW_THRESHOLD: Final = 0.20
# Two candidates for one record within this many match-weight bits of each other are ambiguous.
AMBIGUITY_MARGIN: Final = 3.0
# Parameter floors applied after training (see _regularize).
_M_FLOOR: Final = 0.002
_U_FLOOR: Final = 1e-5
# Pairs scoring below this weight are not worth keeping as evidence (probability ~ 3e-5).
MIN_MATCH_WEIGHT: Final = -15.0

EVIDENCE: Final = pl.List(
    pl.Struct({"comparison": pl.String(), "level": pl.String(), "match_weight": pl.Float64()})
)

#: Scored and deterministic candidate pairs; also the shape of ``decide``'s links.
PAIRS: Final = pl.Schema(
    {
        "pair_id": pl.String(),
        "left_surface": pl.String(),
        "left_id": pl.String(),
        "right_surface": pl.String(),
        "right_id": pl.String(),
        "method": pl.String(),
        "match_weight": pl.Float64(),
        "match_probability": pl.Float64(),
        "evidence": EVIDENCE,
        "flags": pl.List(pl.String()),
    }
)

IDENTITY_REVIEW: Final = pl.Schema(
    {
        "pair_id": pl.String(),
        "left_surface": pl.String(),
        "left_id": pl.String(),
        "right_surface": pl.String(),
        "right_id": pl.String(),
        "match_weight": pl.Float64(),
        "match_probability": pl.Float64(),
        "evidence": EVIDENCE,
        "reason": pl.String(),
        "status": pl.String(),
        "queued_at": UTC_TS,
    }
)

IDENTITY_DECISIONS: Final = pl.Schema(
    {
        "left_surface": pl.String(),
        "left_id": pl.String(),
        "right_surface": pl.String(),
        "right_id": pl.String(),
        "decision": pl.String(),  # 'link' | 'no-link'
        "decided_by": pl.String(),
        "decided_at": UTC_TS,
        "note": pl.String(),
    }
)

PERSON_CROSSWALK: Final = pl.Schema(
    {
        "person_key": pl.String(),
        "source_surface": pl.String(),
        "source_id": pl.String(),
        "method": pl.String(),
        "match_probability": pl.Float64(),
        "linked_at": UTC_TS,
    }
)

PERSON_HISTORY: Final = pl.Schema(
    {
        "event": pl.String(),  # 'create' | 'merge' | 'split' | 'move'
        "person_key": pl.String(),
        "other_person_key": pl.String(),
        "source_surface": pl.String(),
        "source_id": pl.String(),
        "at": UTC_TS,
        "reason": pl.String(),
    }
)

PERSONS: Final = pl.Schema(
    {
        "person_key": pl.String(),
        "record_count": pl.UInt32(),
        "surfaces": pl.List(pl.String()),
        "identifiers": pl.List(IDENTIFIER),
        "given_name": pl.String(),
        "middle_name": pl.String(),
        "family_name": pl.String(),
        "birth_date": pl.Date(),
        "sex": pl.String(),
        "ssn": pl.String(),
        "address_line": pl.String(),
        "address_city": pl.String(),
        "address_state": pl.String(),
        "address_postal_code": pl.String(),
        "phone": pl.String(),
        "email": pl.String(),
        "source_updated_at": UTC_TS,
    }
)

TABLES: Final[dict[str, pl.Schema]] = {
    "person_crosswalk": PERSON_CROSSWALK,
    "persons": PERSONS,
    "person_history": PERSON_HISTORY,
    "identity_review": IDENTITY_REVIEW,
    "identity_decisions": IDENTITY_DECISIONS,
}

# Method precedence when one record has several candidate links: a person's decision beats a shared
# identifier, which beats a score.
_METHOD_RANK: Final = {"decision": 0, "identifier": 1, "probabilistic": 2}

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Normalization


def latest_versions(patients: pl.LazyFrame) -> pl.LazyFrame:
    """One row per (source_surface, source_id): the latest version, since a patient table keeps one
    row per source record version and only the current one describes the person. Ties (and missing
    timestamps) resolve to the first such row."""
    key = list(NATURAL_KEY)
    # A window pick, not sort + unique: unique() gathers the nested identifiers column and is ~15x
    # slower at a million rows.
    updated = pl.col("source_updated_at").cast(pl.Int64).fill_null(-(2**62))
    return patients.filter(pl.int_range(pl.len()).over(key) == updated.arg_max().over(key))


def normalize_system(system: pl.Expr) -> pl.Expr:
    """Identifier system in one spelling: trimmed, lowercased, and an OID always as ``urn:oid:X``
    (the Data Model surface sends a bare OID where FHIR sends the URN)."""
    s = system.str.strip_chars().str.to_lowercase()
    return (
        pl.when(s.str.contains(r"^[0-9]+(\.[0-9]+)+$"))
        .then(pl.lit("urn:oid:") + s)
        .otherwise(s)
        .replace("", None)
    )


def _letters(expr: pl.Expr) -> pl.Expr:
    # NFKD then dropping non-ASCII strips accents (José -> jose) without a transliteration library.
    return (
        expr.str.normalize("NFKD")
        .str.replace_all(r"[^\x00-\x7F]", "")
        .str.to_lowercase()
        .str.replace_all(r"['`.]", "")
        .str.replace_all(r"[^a-z]+", " ")
        .str.strip_chars()
        .replace("", None)
    )


_SOUNDEX_CLASSES: Final = (
    ("[bfpv]", "1"),
    ("[cgjkqsxz]", "2"),
    ("[dt]", "3"),
    ("l", "4"),
    ("[mn]", "5"),
    ("r", "6"),
    ("[aeiouy]", "0"),
)


def _soundex(name: pl.Expr) -> pl.Expr:
    """American Soundex (h and w transparent), as a blocking key tolerant of spelling variants."""
    s = name.str.replace_all("[^a-z]", "").str.replace_all("[hw]", "")
    for pattern, digit in _SOUNDEX_CLASSES:
        s = s.str.replace_all(pattern, digit)
    # The regex engine has no back-references, so runs of each digit are collapsed one by one.
    for digit in "0123456":
        s = s.str.replace_all(f"{digit}+", digit)
    rest = s.str.slice(1).str.replace_all("0", "")
    first = name.str.replace_all("[^a-z]", "").str.slice(0, 1)
    return pl.when(first == "").then(None).otherwise((first + rest + "000").str.slice(0, 4))


_STREET_WORDS: Final = {
    "street": "st",
    "avenue": "ave",
    "av": "ave",
    "road": "rd",
    "drive": "dr",
    "lane": "ln",
    "boulevard": "blvd",
    "court": "ct",
    "place": "pl",
    "terrace": "ter",
    "circle": "cir",
    "highway": "hwy",
    "parkway": "pkwy",
    "square": "sq",
    "apartment": "apt",
    "suite": "ste",
    "unit": "apt",
    "north": "n",
    "south": "s",
    "east": "e",
    "west": "w",
}

_NAME_PARTICLES: Final = (
    "de",
    "del",
    "der",
    "da",
    "di",
    "du",
    "la",
    "le",
    "van",
    "von",
    "st",
    "mc",
    "jr",
    "sr",
)

_NICKNAME_FRAME: Final = pl.DataFrame(
    {
        "given_first": list(FORMAL_NAMES.keys()),
        "formal": [list(v) for v in FORMAL_NAMES.values()],
        "given_variants": [list(VARIANTS[k]) for k in FORMAL_NAMES],
    },
    schema={
        "given_first": pl.String(),
        "formal": pl.List(pl.String()),
        "given_variants": pl.List(pl.String()),
    },
)

#: Columns ``features`` adds; Splink sees only these (plus ``rid``).
FEATURE_COLUMNS: Final = (
    "given",
    "given_formal",
    "given_variants",
    "given_sx",
    "middle",
    "family",
    "family_tokens",
    "family_sx",
    "dob",
    "dob_y",
    "dob_m",
    "dob_d",
    "dob_key",
    "sex",
    "ssn",
    "addr",
    "zip5",
    "phone",
    "email",
)


def _given_features(given_name: pl.LazyFrame) -> pl.LazyFrame:
    full = _letters(pl.col("given_name"))
    return (
        given_name.with_columns(
            given=full.str.replace_all(" ", ""), given_first=full.str.split(" ").list.first()
        )
        .join(_NICKNAME_FRAME.lazy(), on="given_first", how="left")
        .with_columns(
            # The full given name stands for itself; a nickname also stands for its formal names.
            given_formal=pl.concat_list(pl.col("given"), pl.col("formal").fill_null([]))
            .list.drop_nulls()
            .list.unique()
            .list.sort(),
            # Blocking key: the first formal name a nickname stands for (Bob and Robert block together).
            given_sx=_soundex(pl.coalesce(pl.col("formal").list.first(), pl.col("given_first"))),
        )
        .select("given_name", "given", "given_formal", "given_variants", "given_sx")
    )


def _family_features(family_name: pl.LazyFrame) -> pl.LazyFrame:
    full = _letters(pl.col("family_name"))
    tokens = full.str.split(" ")
    return family_name.with_columns(
        family=full.str.replace_all(" ", ""),
        # Hyphenated and compound names as a set of significant words, so "Smith-Jones" and "Smith"
        # share one; particles (de, van, st) are not significant.
        family_tokens=tokens.list.eval(
            pl.element().filter((pl.element().str.len_chars() >= 2) & ~pl.element().is_in(_NAME_PARTICLES))
        )
        .list.unique()
        .list.sort(),
        family_sx=_soundex(tokens.list.first()),
    )


def features(patients: pl.LazyFrame) -> pl.LazyFrame:
    """The comparison columns for matching: names folded to ASCII letters, nickname groups,
    Soundex keys, birth-date parts, digits-only SSN/phone, a canonical street line and ZIP5."""
    addr = (
        pl.col("address_line")
        .str.normalize("NFKD")
        .str.replace_all(r"[^\x00-\x7F]", "")
        .str.to_lowercase()
        .str.replace_all(r"#", " apt ")
        .str.replace_all(r"[.,']", "")
        .str.replace_all(r"[^a-z0-9]+", " ")
        .str.strip_chars()
    )
    addr_tokens = addr.str.split(" ").list.eval(pl.element().replace(_STREET_WORDS))
    ssn = pl.col("ssn").str.replace_all(r"\D", "")
    phone = pl.col("phone").str.replace_all(r"\D", "").str.slice(-10)
    dob = pl.col("birth_date")
    sex = pl.col("sex").str.to_lowercase().str.strip_chars()
    # Names repeat a lot (a million records hold a few thousand distinct names): derive name
    # features once per distinct value and join them back.
    given = _given_features(patients.select("given_name").unique())
    family = _family_features(patients.select("family_name").unique())
    frame = (
        patients.join(given, on="given_name", how="left", nulls_equal=True, maintain_order="left")
        .join(family, on="family_name", how="left", nulls_equal=True, maintain_order="left")
        .with_columns(
            middle=_letters(pl.col("middle_name")).str.replace_all(" ", ""),
            dob=dob.dt.to_string("%Y-%m-%d"),
            dob_y=dob.dt.year().cast(pl.Int32),
            dob_m=dob.dt.month().cast(pl.Int32),
            dob_d=dob.dt.day().cast(pl.Int32),
            sex=pl.when(sex.is_in(["male", "female", "other"])).then(sex).otherwise(None),
            ssn=pl.when(
                (ssn.str.len_chars() == 9) & ~ssn.str.contains(r"^(000|666)|^\d{3}00|0000$|^123456789$")
            )
            .then(ssn)
            .otherwise(None),
            addr=addr_tokens.list.join(" ").replace("", None),
            zip5=pl.col("address_postal_code").str.replace_all(r"\D", "").str.slice(0, 5).replace("", None),
            phone=pl.when(phone.str.len_chars() == 10).then(phone).otherwise(None),
            email=pl.col("email").str.strip_chars().str.to_lowercase().replace("", None),
        )
    )
    return frame.with_columns(
        # Day and month in either order, so a transposed birth date still blocks with the original.
        dob_key=pl.when(pl.col("dob_y").is_not_null()).then(
            pl.format(
                "{}-{}-{}",
                pl.col("dob_y"),
                pl.min_horizontal("dob_m", "dob_d"),
                pl.max_horizontal("dob_m", "dob_d"),
            )
        ),
    )


# --------------------------------------------------------------------------------------------------
# Deterministic pass


def _shared_identifiers(patients: pl.LazyFrame, systems: Sequence[str]) -> pl.LazyFrame:
    wanted = (
        pl.DataFrame({"system": list(systems)}, schema={"system": pl.String()})
        .select(normalize_system(pl.col("system")))
        .to_series()
        .to_list()
    )
    rows = (
        patients.select("source_surface", "source_id", "identifiers")
        .explode("identifiers")
        .unnest("identifiers")
        .with_columns(system=normalize_system(pl.col("system")), value=pl.col("value").str.strip_chars())
        .filter(pl.col("system").is_in(wanted) & (pl.col("value").str.len_chars() > 0))
        .unique(["source_surface", "source_id", "system", "value"])
    )
    # An identifier held by two records of one source is corrupt or reused there; linking on it
    # could merge two people, so it is left to the probabilistic pass.
    return rows.filter(pl.len().over("system", "value") == 1)


def deterministic_links(
    left: pl.LazyFrame, right: pl.LazyFrame, *, systems: Sequence[str] = ENTERPRISE_SYSTEMS
) -> pl.LazyFrame:
    """Pairs whose records carry the same identifier in one of the shared ``systems``.

    Comparison is on normalized ``system|value``: trimmed value, lowercased system, OID in URN form.
    SSN equality is deliberately not a deterministic link: SSNs carry typos and are reused (family
    members, placeholders), so it only weighs as evidence in the probabilistic model.
    """
    lhs = _shared_identifiers(latest_versions(left), systems)
    rhs = _shared_identifiers(latest_versions(right), systems)
    pairs = lhs.join(rhs, on=["system", "value"], suffix="_r").select(
        left_surface=pl.col("source_surface"),
        left_id=pl.col("source_id"),
        right_surface=pl.col("source_surface_r"),
        right_id=pl.col("source_id_r"),
        method=pl.lit("identifier:") + pl.col("system"),
    )
    return (
        pairs.sort("method")
        .unique(["left_surface", "left_id", "right_surface", "right_id"], keep="first", maintain_order=True)
        .with_columns(
            pair_id=_pair_id(),
            match_weight=pl.lit(None, pl.Float64),
            match_probability=pl.lit(1.0),
            evidence=pl.lit([], EVIDENCE),
            flags=pl.lit([], pl.List(pl.String())),
        )
        .select(PAIRS.names())
        .cast(PAIRS)
    )


def _pair_id() -> pl.Expr:
    """An orientation-free id for a pair, so a decision recorded either way round finds its pair."""
    a = pl.concat_str("left_surface", "left_id", separator="\x1f")
    b = pl.concat_str("right_surface", "right_id", separator="\x1f")
    lo = pl.min_horizontal(a, b)
    hi = pl.max_horizontal(a, b)
    return pl.concat_str(lo, hi, separator="\x1e").map_batches(
        lambda s: pl.Series([hashlib.sha256(v.encode()).hexdigest()[:24] for v in s], dtype=pl.String()),
        return_dtype=pl.String(),
    )


# --------------------------------------------------------------------------------------------------
# Probabilistic model


def _level(sql: str, label: str, m: float, *, null: bool = False, tf: str | None = None) -> dict[str, Any]:
    level: dict[str, Any] = {"sql_condition": sql, "label_for_charts": label}
    if null:
        level["is_null_level"] = True
        return level
    level["m_probability"] = m
    if tf is not None:
        level["tf_adjustment_column"] = tf
        level["tf_adjustment_weight"] = 1.0
    return level


def _null(*cols: str) -> dict[str, Any]:
    sql = " OR ".join(f"{c}_l IS NULL OR {c}_r IS NULL" for c in cols)
    return _level(sql, "missing", 0.0, null=True)


# Two given names share a nickname group, or one is a slip away from some name of the other's
# group (Jomes vs Jimmy -> James; Vkal vs Valerie -> Val). Names in no group skip the list scan, and
# the costly edit distance only runs on the few variants a cheap filter leaves (DuckDB evaluates a
# lambda body in full, so the filter is a separate step rather than an AND).
def _slip_any(name: str, variants: str) -> str:
    close = (
        f"list_filter({variants}, lambda x: abs(length(x) - length({name})) <= 1 "
        f"AND jaro_winkler_similarity({name}, x) >= 0.75)"
    )
    return (
        f"(len({variants}) > 1 AND ("
        f"list_bool_or(list_transform({variants}, lambda x: jaro_winkler_similarity({name}, x) >= 0.92)) OR "
        f"(length({name}) >= 4 AND "
        f"list_bool_or(list_transform({close}, lambda x: damerau_levenshtein({name}, x) <= 1)))))"
    )


_NICKNAME: Final = "list_has_any(given_formal_l, given_formal_r)"
_NICKNAME_SLIP: Final = (
    f"{_slip_any('given_l', 'given_variants_r')} OR {_slip_any('given_r', 'given_variants_l')}"
)


# Given and family names exchanged, tolerating a slip in either.
_SWAPPED: Final = "jaro_winkler_similarity(given_l, family_r) >= 0.92 AND jaro_winkler_similarity(family_l, given_r) >= 0.92"


def _typo(col: str) -> str:
    # damerau_levenshtein is ~20x slower than jaro_winkler in DuckDB; the cheap tests in front of it
    # (AND short-circuits) keep it off the great majority of pairs, which differ a lot.
    return (
        f"jaro_winkler_similarity({col}_l, {col}_r) >= 0.92 OR ("
        f"abs(length({col}_l) - length({col}_r)) <= 1 "
        f"AND jaro_winkler_similarity({col}_l, {col}_r) >= 0.8 "
        f"AND damerau_levenshtein({col}_l, {col}_r) <= 1)"
    )


def _one_edit(col: str) -> str:
    # For fixed-width digit strings (birth date, SSN, phone): one substituted digit, or two
    # adjacent digits swapped. Hamming distance is cheap and screens for the transposition test.
    return (
        f"hamming({col}_l, {col}_r) <= 1 OR "
        f"(hamming({col}_l, {col}_r) = 2 AND damerau_levenshtein({col}_l, {col}_r) <= 1)"
    )


def _comparisons() -> list[dict[str, Any]]:
    """The comparison levels, most specific first. Starting m values are priors EM refines; levels
    EM rarely sees (swapped names) keep their prior."""
    given = {
        "output_column_name": "given_name",
        "comparison_description": "given name: exact, nickname, swapped, typo, nickname slip, prefix",
        "comparison_levels": [
            _null("given"),
            _level("given_l = given_r", "exact", 0.85, tf="given"),
            _level(_NICKNAME, "nickname", 0.05),
            _level(_SWAPPED, "swapped", 0.01),
            _level(_typo("given"), "typo", 0.05),
            # After the typo level: a plain slip in a formal name (Margret) is a typo; this level is
            # a slip in a nickname (Jomes for Jimmy, i.e. James).
            _level(_NICKNAME_SLIP, "nickname with a slip", 0.01),
            _level(
                "starts_with(given_l, given_r) OR starts_with(given_r, given_l)",
                "initial or prefix",
                0.005,
            ),
            _level("ELSE", "different", 0.02),
        ],
    }
    family = {
        "output_column_name": "family_name",
        "comparison_description": "family name: exact, swapped with given, shared token, typo",
        "comparison_levels": [
            _null("family"),
            _level("family_l = family_r", "exact", 0.85, tf="family"),
            _level(_SWAPPED, "swapped", 0.01),
            _level("list_has_any(family_tokens_l, family_tokens_r)", "shared token", 0.05),
            _level(
                _typo("family"),
                "typo",
                0.05,
            ),
            _level("ELSE", "different", 0.04),
        ],
    }
    middle = {
        "output_column_name": "middle_name",
        "comparison_description": "middle name: exact, same initial",
        "comparison_levels": [
            _null("middle"),
            _level("middle_l = middle_r", "exact", 0.85),
            _level("left(middle_l, 1) = left(middle_r, 1)", "same initial", 0.1),
            _level("ELSE", "different", 0.05),
        ],
    }
    dob = {
        "output_column_name": "birth_date",
        "comparison_description": "birth date: exact, day/month transposed, one edit, year off by one",
        "comparison_levels": [
            _null("dob"),
            _level("dob_l = dob_r", "exact", 0.9),
            _level(
                "dob_y_l = dob_y_r AND dob_m_l = dob_d_r AND dob_d_l = dob_m_r", "day-month swapped", 0.03
            ),
            _level(_one_edit("dob"), "one edit", 0.03),
            _level(
                "abs(dob_y_l - dob_y_r) <= 1 AND dob_m_l = dob_m_r AND dob_d_l = dob_d_r",
                "year off by one",
                0.02,
            ),
            _level("ELSE", "different", 0.02),
        ],
    }
    sex = {
        "output_column_name": "sex",
        "comparison_description": "administrative sex",
        "comparison_levels": [
            _null("sex"),
            _level("sex_l = sex_r", "exact", 0.97),
            _level("ELSE", "different", 0.03),
        ],
    }
    ssn = {
        "output_column_name": "ssn",
        "comparison_description": "SSN: exact, one digit or adjacent transposition",
        "comparison_levels": [
            _null("ssn"),
            _level("ssn_l = ssn_r", "exact", 0.9),
            _level(_one_edit("ssn"), "one edit", 0.05),
            _level("ELSE", "different", 0.05),
        ],
    }
    # Street line and ZIP are one fact (where the person lives), so they are one comparison: two
    # comparisons would count a shared household address twice.
    address = {
        "output_column_name": "address",
        "comparison_description": "home address: same line and ZIP, close line, same ZIP, same area",
        "comparison_levels": [
            _level(
                "(addr_l IS NULL OR addr_r IS NULL) AND (zip5_l IS NULL OR zip5_r IS NULL)",
                "missing",
                0.0,
                null=True,
            ),
            _level("addr_l = addr_r AND coalesce(zip5_l = zip5_r, true)", "same address", 0.7),
            _level(
                "jaro_winkler_similarity(addr_l, addr_r) >= 0.9 AND coalesce(zip5_l = zip5_r, true)",
                "close address",
                0.05,
            ),
            _level("zip5_l = zip5_r", "same postal code", 0.05, tf="zip5"),
            _level("left(zip5_l, 3) = left(zip5_r, 3)", "same area", 0.08),
            _level("ELSE", "different", 0.12),
        ],
    }
    phone = {
        "output_column_name": "phone",
        "comparison_description": "phone: exact, one edit",
        "comparison_levels": [
            _null("phone"),
            _level("phone_l = phone_r", "exact", 0.75),
            _level(_one_edit("phone"), "one edit", 0.05),
            _level("ELSE", "different", 0.2),
        ],
    }
    email = {
        "output_column_name": "email",
        "comparison_description": "email: exact, same mailbox name",
        "comparison_levels": [
            _null("email"),
            _level("email_l = email_r", "exact", 0.8),
            _level("split_part(email_l, '@', 1) = split_part(email_r, '@', 1)", "same mailbox", 0.05),
            _level("ELSE", "different", 0.15),
        ],
    }
    return [given, family, middle, dob, sex, ssn, address, phone, email]


#: Candidate pairs: a pair is scored when it agrees on any one rule. Each rule is narrow enough to
#: stay small at a million records; together they cover the noise the model tolerates (a typo in
#: one field never hides a pair from every rule).
BLOCKING_RULES: Final[tuple[str, ...]] = (
    "l.dob_key = r.dob_key AND l.family_sx = r.family_sx",
    "l.dob_key = r.dob_key AND l.given_sx = r.given_sx",
    "l.dob_key = r.dob_key AND l.zip5 = r.zip5",
    "l.dob_key = r.dob_key AND l.given_sx = r.family_sx",
    "l.ssn = r.ssn",
    "l.phone = r.phone",
    "l.email = r.email",
    "l.given_sx = r.given_sx AND l.family_sx = r.family_sx AND l.zip5 = r.zip5",
)

#: EM sessions: each fixes some comparisons (those in its rule) and estimates the others.
_EM_RULES: Final[tuple[str, ...]] = (
    "l.dob = r.dob AND l.family_sx = r.family_sx",
    "l.given = r.given AND l.family = r.family",
    "l.ssn = r.ssn",
)


def settings(*, probability_two_random_records_match: float = 1e-4) -> dict[str, Any]:
    """The untrained Splink settings: comparisons, blocking rules, column names."""
    return {
        "link_type": "link_only",
        "unique_id_column_name": "rid",
        "probability_two_random_records_match": probability_two_random_records_match,
        "comparisons": _comparisons(),
        "blocking_rules_to_generate_predictions": [
            {"blocking_rule": rule, "sql_dialect": "duckdb"} for rule in BLOCKING_RULES
        ],
        "retain_matching_columns": True,
        "retain_intermediate_calculation_columns": True,
        "em_convergence": 0.001,
        "max_iterations": 25,
    }


@contextlib.contextmanager
def _quiet_splink() -> Iterator[None]:
    # Splink logs parameter estimates and SQL at INFO; none of it is PHI, but a pipeline's log is
    # no place for it, and a future Splink could log sample rows.
    logger = logging.getLogger("splink")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


class IdentityError(RuntimeError):
    """A failure inside the matching engine, reported without the engine's message (see _session)."""


@dataclasses.dataclass
class _Session:
    con: duckdb.DuckDBPyConnection
    left: Any
    right: Any
    left_keys: pl.DataFrame
    right_keys: pl.DataFrame


@contextlib.contextmanager
def _session(
    left: pl.DataFrame | pl.LazyFrame,
    right: pl.DataFrame | pl.LazyFrame,
    *,
    threads: int | None,
    memory_limit: str | None,
) -> Iterator[_Session]:
    from splink import DuckDBAPI
    from splink.internals.exceptions import SplinkException  # Splink's wrapper: SQL + DuckDB message

    # Sorted so that row ids, and with them Splink's hash-based samples, repeat between runs.
    lhs = features(latest_versions(left.lazy())).sort(NATURAL_KEY).collect()
    rhs = features(latest_versions(right.lazy())).sort(NATURAL_KEY).collect()
    # Splink joins on a small integer id; the natural key goes back on afterwards.
    lhs = lhs.with_row_index("rid").with_columns(pl.col("rid").cast(pl.Int64))
    rhs = rhs.with_row_index("rid").with_columns(pl.col("rid").cast(pl.Int64) + lhs.height)
    config: dict[str, Any] = {}
    if threads:
        config["threads"] = threads
    if memory_limit:
        config["memory_limit"] = memory_limit
    con = duckdb.connect(":memory:", config=config)
    try:
        # The progress bar writes to stdout: noise in logs and CLI output.
        con.execute("SET enable_progress_bar = false")
        db = DuckDBAPI(con)
        cols = ["rid", *FEATURE_COLUMNS]
        left_sdf = db.register(lhs.select(cols).to_arrow(), dataset_display_name="lhs")
        right_sdf = db.register(rhs.select(cols).to_arrow(), dataset_display_name="rhs")
        yield _Session(
            con=con,
            left=left_sdf,
            right=right_sdf,
            left_keys=lhs.select("rid", "source_surface", "source_id"),
            right_keys=rhs.select("rid", "source_surface", "source_id"),
        )
    except (duckdb.Error, SplinkException) as err:
        # DuckDB quotes offending values in some messages (a failed cast shows the value), and
        # those values are patient data: keep the kind of failure, drop the message and its chain.
        raise IdentityError(f"identity matching failed in DuckDB ({type(err).__name__})") from None
    finally:
        con.close()


def train_model(
    left: pl.DataFrame | pl.LazyFrame,
    right: pl.DataFrame | pl.LazyFrame,
    *,
    seed: int = 0,
    max_u_pairs: float = 2e6,
    max_em_pairs: float = 2e6,
    threads: int | None = None,
    memory_limit: str | None = None,
) -> dict[str, Any]:
    """Train the Fellegi-Sunter model without labels; returns a JSON-serializable model.

    u probabilities come from random pairs (almost all non-matches), m probabilities from EM over
    blocked pairs, and the prior probability of a match from the EM sessions. Deterministic given
    ``seed`` and the input.
    """
    from splink import Linker

    with _quiet_splink(), _session(left, right, threads=threads, memory_limit=memory_limit) as s:
        n_left, n_right = s.left_keys.height, s.right_keys.height
        if n_left == 0 or n_right == 0:
            raise ValueError("train_model needs records on both sides")
        # Prior: at most one match per record of the smaller side; EM refines it below.
        prior = min(n_left, n_right) / (n_left * n_right) * 0.5
        linker = Linker(
            [s.left, s.right], settings(probability_two_random_records_match=prior), log_level=None
        )
        # No early stop and one chunk: Splink's early stop depends on chunk order, and a model
        # that changes between identical runs would move links between runs.
        linker.training.estimate_u_using_random_sampling(
            max_pairs=min(max_u_pairs, float(n_left * n_right)),
            seed=seed,
            min_count_per_level=None,
            num_chunks=1,
        )
        for rule in _EM_RULES:
            linker.training.estimate_parameters_using_expectation_maximisation(
                rule,
                estimate_without_term_frequencies=True,
                max_pairs=max_em_pairs,
            )
        trained = linker.misc.save_model_to_json()
    trained.pop("linker_uid", None)
    _regularize(trained)
    trained["probability_two_random_records_match"] = prior
    return {"format": MODEL_FORMAT, "splink": trained}


def _regularize(splink_settings: dict[str, Any]) -> None:
    """Bound every level's parameters so that no single field can decide a pair on its own.

    EM on clean data can drive the m probability of a disagreement level to ~0 (a -70 bit weight
    for a differing birth date), which would make one data-entry error veto a true match; random
    sampling can leave a rare agreement level with a u of a few random pairs, or none. The floors
    cap any level's influence at roughly +/-13 bits.
    """
    for comparison in splink_settings["comparisons"]:
        levels = [lv for lv in comparison["comparison_levels"] if not lv.get("is_null_level")]
        for lv in levels:
            lv["m_probability"] = max(float(lv.get("m_probability") or _M_FLOOR), _M_FLOOR)
            lv["u_probability"] = max(float(lv.get("u_probability") or _U_FLOOR), _U_FLOOR)
        for key in ("m_probability", "u_probability"):
            total = sum(lv[key] for lv in levels)
            for lv in levels:
                # Rounded: parallel sums in DuckDB differ in the last bits from run to run, and a
                # model should serialize the same way for the same input.
                lv[key] = float(f"{lv[key] / total:.10g}")


def _check_model(model: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(model, dict) or model.get("format") != MODEL_FORMAT or "splink" not in model:
        raise ValueError(f"not an identity model of format {MODEL_FORMAT}; retrain with train_model")
    return dict(model["splink"])


def _level_labels(splink_settings: dict[str, Any]) -> dict[str, dict[int, str]]:
    """gamma value -> level label per comparison, following Splink's numbering (highest non-null
    level first, counting down to 0; null is -1)."""
    out: dict[str, dict[int, str]] = {}
    for comparison in splink_settings["comparisons"]:
        levels = comparison["comparison_levels"]
        non_null = [lv for lv in levels if not lv.get("is_null_level")]
        labels = {len(non_null) - 1 - i: lv["label_for_charts"] for i, lv in enumerate(non_null)}
        labels[-1] = "missing"
        out[comparison["output_column_name"]] = labels
    return out


# Levels that tie a pair to one person beyond name, birth date and sex. A pair with none of them is
# never linked automatically (flag 'uncorroborated').
_CORROBORATING: Final[dict[str, tuple[str, ...]]] = {
    "ssn": ("exact", "one edit"),
    "phone": ("exact", "one edit"),
    "email": ("exact", "same mailbox"),
    "address": ("same address", "close address", "same postal code"),
    "middle_name": ("exact",),
}


def score_pairs(
    left: pl.DataFrame | pl.LazyFrame,
    right: pl.DataFrame | pl.LazyFrame,
    model: dict[str, Any],
    *,
    min_match_weight: float = MIN_MATCH_WEIGHT,
    threads: int | None = None,
    memory_limit: str | None = None,
) -> pl.DataFrame:
    """Score candidate pairs (left record, right record) from the blocking rules with ``model``.

    Returns ``PAIRS`` rows (method 'probabilistic') at or above ``min_match_weight``; ``evidence``
    holds each comparison's level and match weight (term-frequency adjustment included) and
    ``flags`` the conflict rules the pair trips ('uncorroborated', 'dob-differs', 'ssn-differs',
    'possible-relative'); a flagged pair is never linked automatically.
    """
    from splink import Linker

    splink_settings = _check_model(model)
    labels = _level_labels(splink_settings)
    names = list(labels)
    with _quiet_splink(), _session(left, right, threads=threads, memory_limit=memory_limit) as s:
        linker = Linker([s.left, s.right], splink_settings, log_level=None, validate_settings=False)
        predictions = linker.inference.predict(threshold_match_weight=min_match_weight, warning_mode="never")
        mw_cols = []
        for name in names:
            tf = f"mw_tf_adj_{name}"
            has_tf = any(lv.get("tf_adjustment_column") for lv in _comparison(splink_settings, name))
            mw_cols.append(f"mw_{name}" + (f" + {tf}" if has_tf else "") + f" AS mw_{name}")
        sql = (
            f"SELECT rid_l, rid_r, source_dataset_l, match_weight, "
            f"match_probability, {', '.join(f'gamma_{n}' for n in names)}, {', '.join(mw_cols)} "
            f"FROM {predictions.physical_name}"
        )
        raw = pl.from_arrow(s.con.sql(sql).to_arrow_table())
        assert isinstance(raw, pl.DataFrame)
        left_keys, right_keys = s.left_keys, s.right_keys
    # Splink orders each pair by its own rules; put the left input's record on the left.
    swapped = pl.col("source_dataset_l") != "lhs"
    raw = raw.with_columns(
        rid_a=pl.when(swapped).then("rid_r").otherwise("rid_l"),
        rid_b=pl.when(swapped).then("rid_l").otherwise("rid_r"),
    )
    pairs = raw.join(
        left_keys.rename({"rid": "rid_a", "source_surface": "left_surface", "source_id": "left_id"}),
        on="rid_a",
    ).join(
        right_keys.rename({"rid": "rid_b", "source_surface": "right_surface", "source_id": "right_id"}),
        on="rid_b",
    )
    evidence = pl.concat_list(
        [
            pl.struct(
                comparison=pl.lit(name),
                level=pl.col(f"gamma_{name}").replace_strict(labels[name], return_dtype=pl.String()),
                match_weight=pl.col(f"mw_{name}").cast(pl.Float64),
            )
            for name in names
        ]
    )
    level = {
        name: pl.col(f"gamma_{name}").replace_strict(labels[name], return_dtype=pl.String()) for name in names
    }
    corroborated = pl.any_horizontal(
        level[name].is_in(levels) for name, levels in _CORROBORATING.items() if name in level
    )
    flags = pl.concat_list(
        [
            pl.when(level["ssn"] == "different")
            .then(pl.lit(["ssn-differs"]))
            .otherwise(pl.lit([], pl.List(pl.String()))),
            # Name and birth date alone are what strangers share too (two Maria Garcias born the same
            # day): without one agreeing contact or identifier a person has to look.
            pl.when(~corroborated)
            .then(pl.lit(["uncorroborated"]))
            .otherwise(pl.lit([], pl.List(pl.String()))),
            # A birth date that is not even a slip away: a parent and child who share name and
            # address (Jr/Sr) look alike on everything else.
            pl.when(level["birth_date"] == "different")
            .then(pl.lit(["dob-differs"]))
            .otherwise(pl.lit([], pl.List(pl.String()))),
            # Twins and same-family relatives agree on family, birth date and address but differ
            # in given name; only an identical SSN outweighs that.
            pl.when(
                (
                    level["given_name"].is_in(["different", "initial or prefix"])
                    # A slip away from a nickname is too loose to tell siblings apart (Anna and
                    # Ann) unless something personal, not household-wide, agrees as well.
                    | (
                        (level["given_name"] == "nickname with a slip")
                        & (level["middle_name"] != "exact")
                        & (level["email"] != "exact")
                    )
                )
                & (level["ssn"] != "exact")
                & level["family_name"].is_in(["exact", "shared token", "typo"])
                & level["birth_date"].is_in(["exact", "day-month swapped"])
            )
            .then(pl.lit(["possible-relative"]))
            .otherwise(pl.lit([], pl.List(pl.String()))),
        ]
    )
    return (
        pairs.with_columns(
            method=pl.lit("probabilistic"),
            evidence=evidence,
            flags=flags,
        )
        .with_columns(pair_id=_pair_id())
        .select(PAIRS.names())
        .cast(PAIRS)
    )


def _comparison(splink_settings: dict[str, Any], name: str) -> list[dict[str, Any]]:
    for comparison in splink_settings["comparisons"]:
        if comparison["output_column_name"] == name:
            return list(comparison["comparison_levels"])
    raise KeyError(name)


# --------------------------------------------------------------------------------------------------
# Decisions


def _method_rank() -> pl.Expr:
    kind = pl.col("method").str.split(":").list.first()
    return kind.replace_strict(_METHOD_RANK, default=len(_METHOD_RANK), return_dtype=pl.Int32)


def _one_to_one(candidates: pl.DataFrame) -> pl.DataFrame:
    """Greedy one-to-one assignment: repeatedly accept pairs that are the best remaining choice of
    both their records, in (method rank, weight desc, pair_id) order. Equivalent to taking pairs in
    that order and skipping any whose record is already used, but vectorized."""
    order = candidates.with_columns(
        _rank=_method_rank(),
        _w=pl.col("match_weight").fill_null(math.inf),
    ).sort(["_rank", "_w", "pair_id"], descending=[False, True, False])
    order = order.with_row_index("_pos")
    accepted: list[pl.DataFrame] = []
    remaining = order
    while remaining.height:
        best_left = pl.col("_pos") == pl.col("_pos").min().over("left_surface", "left_id")
        best_right = pl.col("_pos") == pl.col("_pos").min().over("right_surface", "right_id")
        chosen = remaining.filter(best_left & best_right)
        accepted.append(chosen)
        remaining = remaining.join(
            chosen.select("left_surface", "left_id"), on=["left_surface", "left_id"], how="anti"
        ).join(chosen.select("right_surface", "right_id"), on=["right_surface", "right_id"], how="anti")
    out = pl.concat(accepted) if accepted else order.clear()
    return out.sort("_pos").drop("_pos", "_rank", "_w")


def _latest_decisions(decisions: pl.DataFrame | None) -> pl.DataFrame:
    if decisions is None or decisions.height == 0:
        return pl.DataFrame(schema={**IDENTITY_DECISIONS, "pair_id": pl.String()})
    bad = decisions.filter(~pl.col("decision").is_in(["link", "no-link"])).height
    if bad:
        raise ValueError(f"{bad} identity decision(s) are neither 'link' nor 'no-link'")
    return (
        decisions.with_columns(pair_id=_pair_id())
        .sort("decided_at")
        .unique("pair_id", keep="last", maintain_order=True)
    )


def decide(
    pairs: pl.DataFrame,
    *,
    now: datetime,
    link_threshold: float = LINK_THRESHOLD,
    review_threshold: float = REVIEW_THRESHOLD,
    decisions: pl.DataFrame | None = None,
    ambiguity_margin: float = AMBIGUITY_MARGIN,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split candidate pairs into links (``PAIRS``) and a review queue (``IDENTITY_REVIEW``).

    Rules, in order: the latest recorded decision per pair wins ('no-link' removes the pair for good,
    'link' links it even if no rule found it); an identifier link is accepted; a scored pair links at
    ``match_probability >= link_threshold`` unless it is flagged (different SSNs, possible relative)
    or ambiguous (another candidate for one of its records within ``ambiguity_margin`` bits), in
    which case it goes to review; pairs between the thresholds go to review. Links are then made
    one-to-one; a pair whose record is already linked leaves the review queue too.
    """
    if not 0.0 <= review_threshold <= link_threshold <= 1.0:
        raise ValueError("thresholds must satisfy 0 <= review_threshold <= link_threshold <= 1")
    pairs = pairs.select(PAIRS.names()).cast(PAIRS)
    # One row per pair: an identifier link beats a score of the same pair, but keeps its evidence.
    evidence = (
        pairs.filter(pl.col("method") == "probabilistic")
        .select("pair_id", ev="evidence", mw="match_weight")
        .unique("pair_id", keep="first")
    )
    pairs = (
        pairs.with_columns(_rank=_method_rank())
        .sort(["_rank", "pair_id"])
        .unique("pair_id", keep="first", maintain_order=True)
        .drop("_rank")
        .join(evidence, on="pair_id", how="left")
        .with_columns(
            evidence=pl.when(pl.col("evidence").list.len() == 0).then("ev").otherwise("evidence"),
            match_weight=pl.coalesce("match_weight", "mw"),
        )
        .drop("ev", "mw")
    )
    latest = _latest_decisions(decisions)
    no_link = latest.filter(pl.col("decision") == "no-link").select("pair_id")
    yes = latest.filter(pl.col("decision") == "link")
    pairs = pairs.join(no_link, on="pair_id", how="anti")
    decided = (
        yes.select("pair_id", "left_surface", "left_id", "right_surface", "right_id")
        .join(
            pairs.select("pair_id", "match_weight", "match_probability", "evidence"), on="pair_id", how="left"
        )
        .with_columns(
            method=pl.lit("decision"),
            evidence=pl.col("evidence").fill_null(pl.lit([], EVIDENCE)),
            flags=pl.lit([], pl.List(pl.String())),
        )
        .select(PAIRS.names())
        .cast(PAIRS)
    )
    undecided = pairs.join(decided.select("pair_id"), on="pair_id", how="anti")
    deterministic = undecided.filter(pl.col("method").str.starts_with("identifier:"))
    scored = undecided.filter(pl.col("method") == "probabilistic")

    # Ambiguity among strong candidates: the runner-up for a record is nearly as good as the best.
    # (Windows in two steps: a window inside a window is orders of magnitude slower in polars.)
    close_l = pl.col("match_weight") >= pl.col("_best_l") - ambiguity_margin
    close_r = pl.col("match_weight") >= pl.col("_best_r") - ambiguity_margin
    strong = (
        scored.filter(pl.col("match_probability") >= review_threshold)
        .with_columns(
            _best_l=pl.col("match_weight").max().over("left_surface", "left_id"),
            _best_r=pl.col("match_weight").max().over("right_surface", "right_id"),
        )
        .with_columns(
            _ambiguous=(close_l & (close_l.sum().over("left_surface", "left_id") > 1))
            | (close_r & (close_r.sum().over("right_surface", "right_id") > 1))
        )
        .drop("_best_l", "_best_r")
    )
    auto = strong.filter(
        (pl.col("match_probability") >= link_threshold)
        & (pl.col("flags").list.len() == 0)
        & ~pl.col("_ambiguous")
    ).drop("_ambiguous")
    links = _one_to_one(pl.concat([decided, deterministic, auto]))

    reason = (
        pl.when(pl.col("flags").list.len() > 0)
        .then(pl.col("flags").list.join(","))
        .when(pl.col("_ambiguous"))
        .then(pl.lit("ambiguous"))
        .when(pl.col("match_probability") < link_threshold)
        .then(pl.lit("between thresholds"))
        .otherwise(pl.lit("lost one-to-one"))
    )
    review = (
        strong.join(links.select("pair_id"), on="pair_id", how="anti")
        .join(links.select("left_surface", "left_id"), on=["left_surface", "left_id"], how="anti")
        .join(links.select("right_surface", "right_id"), on=["right_surface", "right_id"], how="anti")
        .with_columns(reason=reason, status=pl.lit("pending"), queued_at=pl.lit(now).cast(UTC_TS))
        .sort("match_weight", descending=True)
        .select(IDENTITY_REVIEW.names())
        .cast(IDENTITY_REVIEW)
    )
    return links, review


# --------------------------------------------------------------------------------------------------
# Persons


def _components(nodes: pl.DataFrame, edges: pl.DataFrame) -> pl.DataFrame:
    """Connected components by min-label propagation: node -> comp (the smallest node id in it)."""
    labels = nodes.select("node", comp=pl.col("node"))
    both = pl.concat([edges.select(a="a", b="b"), edges.select(a="b", b="a")])
    while True:
        proposed = (
            both.join(labels, left_on="b", right_on="node")
            .group_by("a")
            .agg(pl.col("comp").min().alias("cand"))
        )
        updated = labels.join(proposed, left_on="node", right_on="a", how="left").with_columns(
            comp=pl.min_horizontal("comp", "cand")
        )
        changed = updated.filter(pl.col("comp") != pl.col("cand").fill_null(pl.col("comp")))
        labels = updated.select("node", "comp")
        if (
            changed.height == 0
            and proposed.join(labels, left_on="a", right_on="node")
            .filter(pl.col("cand") < pl.col("comp"))
            .height
            == 0
        ):
            return labels


def _new_key(surface: str, source_id: str, salt: str = "") -> str:
    digest = hashlib.sha256(f"{surface}\x1f{source_id}{salt}".encode()).hexdigest()
    return f"psn_{digest[:24]}"


def cluster(
    records: pl.DataFrame | pl.LazyFrame,
    links: pl.DataFrame,
    previous_crosswalk: pl.DataFrame | None = None,
    *,
    now: datetime,
    previous_history: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Group records into persons; returns (``PERSON_CROSSWALK``, new ``PERSON_HISTORY`` events).

    ``records`` is every current patient record (``source_surface``, ``source_id``); a record only
    in ``previous_crosswalk`` keeps its row unchanged. Key rules:
    - each previous key goes to the component holding most of its current records (ties: the one
      holding its earliest-linked record); that component keeps it;
    - a component receiving several keys keeps the oldest (earliest ``linked_at``, then smallest
      key) and retires the others ('merge');
    - a component receiving none gets a new key: ``psn_`` + hash of its smallest (surface, id),
      salted if that key was ever issued; it is a 'split' when its records had a key before,
      else 'create'; a record changing between surviving keys is a 'move'.
    """
    recs = (
        records.lazy()
        .select("source_surface", "source_id")
        .unique()
        .sort("source_surface", "source_id")
        .collect()
        .with_row_index("node")
    )
    prev = (
        previous_crosswalk.select(PERSON_CROSSWALK.names()).cast(PERSON_CROSSWALK)
        if previous_crosswalk is not None
        else pl.DataFrame(schema=PERSON_CROSSWALK)
    )
    links = links.select(PAIRS.names()).cast(PAIRS)
    ends = recs.select("node", "source_surface", "source_id")
    edges = (
        links.join(ends, left_on=["left_surface", "left_id"], right_on=["source_surface", "source_id"])
        .rename({"node": "a"})
        .join(ends, left_on=["right_surface", "right_id"], right_on=["source_surface", "source_id"])
        .rename({"node": "b"})
    )
    comps = _components(recs.select("node"), edges.select("a", "b")).join(recs, on="node")

    # Age of each previous key: its earliest linked_at over all its rows.
    key_age = prev.group_by("person_key").agg(created=pl.col("linked_at").min())
    members = comps.join(
        prev.select("source_surface", "source_id", prev_key="person_key", prev_linked_at="linked_at"),
        on=["source_surface", "source_id"],
        how="inner",
    )
    homes = (
        members.group_by("prev_key", "comp")
        .agg(n=pl.len(), first_linked=pl.col("prev_linked_at").min())
        .sort(["prev_key", "n", "first_linked", "comp"], descending=[False, True, False, False])
        .unique("prev_key", keep="first", maintain_order=True)
        .join(key_age, left_on="prev_key", right_on="person_key", how="left")
    )
    survivors = homes.sort(["comp", "created", "prev_key"]).unique("comp", keep="first", maintain_order=True)
    merged = homes.join(survivors.select("comp", survivor="prev_key"), on="comp").filter(
        pl.col("prev_key") != pl.col("survivor")
    )

    # Keys for components that kept none.
    used: set[str] = set(prev.get_column("person_key").to_list())
    if previous_history is not None:
        for col in ("person_key", "other_person_key"):
            used.update(v for v in previous_history.get_column(col).to_list() if v is not None)
    keyless = (
        comps.join(survivors.select("comp"), on="comp", how="anti")
        .sort("source_surface", "source_id")
        .unique("comp", keep="first", maintain_order=True)
    )
    new_rows: list[tuple[int, str]] = []
    stamp = now.isoformat()
    for comp, surface, source_id in keyless.select("comp", "source_surface", "source_id").iter_rows():
        key = _new_key(surface, source_id)
        n = 0
        while key in used:
            n += 1
            key = _new_key(surface, source_id, f"\x1f{stamp}\x1f{n}")
        used.add(key)
        new_rows.append((comp, key))
    new_keys = pl.DataFrame(new_rows, schema={"comp": pl.UInt32(), "person_key": pl.String()}, orient="row")
    comp_keys = pl.concat([survivors.select(pl.col("comp").cast(pl.UInt32), person_key="prev_key"), new_keys])

    assigned = comps.with_columns(pl.col("comp").cast(pl.UInt32)).join(comp_keys, on="comp")
    # Per record: its strongest incident link explains how it joined the person.
    link_ends = pl.concat(
        [
            edges.select(node="a", method="method", match_probability="match_probability"),
            edges.select(node="b", method="method", match_probability="match_probability"),
        ]
    ).with_columns(_rank=_method_rank())
    best_link = (
        link_ends.sort(
            ["node", "_rank", "match_probability"], descending=[False, False, True], nulls_last=True
        )
        .unique("node", keep="first", maintain_order=True)
        .drop("_rank")
    )
    current = (
        assigned.join(best_link, on="node", how="left")
        .join(
            prev.select("source_surface", "source_id", prev_key="person_key", prev_linked_at="linked_at"),
            on=["source_surface", "source_id"],
            how="left",
        )
        .with_columns(
            method=pl.col("method").fill_null("singleton"),
            linked_at=pl.when(pl.col("prev_key") == pl.col("person_key"))
            .then("prev_linked_at")
            .otherwise(pl.lit(now).cast(UTC_TS)),
        )
    )
    carried = prev.join(
        recs.select("source_surface", "source_id"), on=["source_surface", "source_id"], how="anti"
    )
    crosswalk = pl.concat([current.select(PERSON_CROSSWALK.names()).cast(PERSON_CROSSWALK), carried]).sort(
        "person_key", "source_surface", "source_id"
    )

    at = pl.lit(now).cast(UTC_TS)
    events: list[pl.DataFrame] = []
    new_with_prev = new_keys.join(
        current.select(pl.col("comp").cast(pl.UInt32), "prev_key").drop_nulls(), on="comp"
    ).unique(["comp", "prev_key"])
    events.append(
        new_with_prev.select(
            event=pl.lit("split"),
            person_key="person_key",
            other_person_key="prev_key",
            reason=pl.lit("records of an existing person no longer link to it"),
        )
    )
    created = new_keys.join(new_with_prev.select("comp"), on="comp", how="anti")
    events.append(
        created.select(
            event=pl.lit("create"),
            person_key="person_key",
            other_person_key=pl.lit(None, pl.String()),
            reason=pl.lit("new record(s)"),
        )
    )
    events.append(
        merged.select(
            event=pl.lit("merge"),
            person_key="survivor",
            other_person_key="prev_key",
            reason=pl.lit("records of two persons now link; the older key survives"),
        )
    )
    retired = set(merged.get_column("prev_key").to_list())
    moved = current.filter(
        pl.col("prev_key").is_not_null()
        & (pl.col("prev_key") != pl.col("person_key"))
        & ~pl.col("prev_key").is_in(list(retired))
        & ~pl.col("person_key").is_in(new_keys.get_column("person_key").to_list())
    )
    history = pl.concat(
        [
            pl.concat(events).with_columns(
                source_surface=pl.lit(None, pl.String()), source_id=pl.lit(None, pl.String()), at=at
            ),
            moved.select(
                event=pl.lit("move"),
                person_key="person_key",
                other_person_key="prev_key",
                source_surface="source_surface",
                source_id="source_id",
                at=at,
                reason=pl.lit("record now links to another person"),
            ),
        ],
        how="diagonal",
    ).select(PERSON_HISTORY.names())
    return crosswalk, history.cast(PERSON_HISTORY)


def golden_records(patients: pl.DataFrame | pl.LazyFrame, crosswalk: pl.DataFrame) -> pl.DataFrame:
    """One ``PERSONS`` row per person_key. Survivorship (docs/identity.md):

    - each field takes the value of the most recently updated record that has one (ties: FHIR
      before Data Model, then source_id), because a later record reflects later corrections and
      name or contact changes;
    - the address (line, city, state, postal code) is taken whole from one record, so a golden row
      never mixes two addresses;
    - ``sex`` ignores 'unknown' when a record knows better;
    - ``identifiers`` is the union of every record's identifiers (system normalized), deduplicated.
    """
    recs = (
        latest_versions(patients.lazy())
        .join(crosswalk.lazy().select("person_key", *NATURAL_KEY), on=list(NATURAL_KEY))
        .with_columns(
            _surface_rank=pl.col("source_surface").replace_strict(
                {"fhir": 0}, default=1, return_dtype=pl.Int32
            )
        )
        .sort(
            ["person_key", "source_updated_at", "_surface_rank", "source_id"],
            descending=[False, True, False, False],
            nulls_last=True,
        )
    )
    scalar = ["given_name", "middle_name", "family_name", "birth_date", "ssn", "phone", "email"]
    address = ["address_line", "address_city", "address_state", "address_postal_code"]
    has_address = pl.any_horizontal(pl.col(c).is_not_null() for c in address)
    known_sex = pl.col("sex").filter(pl.col("sex").is_not_null() & (pl.col("sex") != "unknown"))
    grouped = recs.group_by("person_key", maintain_order=True).agg(
        [
            pl.len().cast(pl.UInt32).alias("record_count"),
            pl.col("source_surface").unique().sort().alias("surfaces"),
            *[pl.col(c).drop_nulls().first().alias(c) for c in scalar],
            *[pl.col(c).filter(has_address).first().alias(c) for c in address],
            pl.coalesce(known_sex.first(), pl.col("sex").drop_nulls().first()).alias("sex"),
            pl.col("source_updated_at").max().alias("source_updated_at"),
        ]
    )
    idents = (
        recs.select("person_key", "identifiers")
        .explode("identifiers")
        .drop_nulls("identifiers")
        .unnest("identifiers")
        .with_columns(system=normalize_system(pl.col("system")), value=pl.col("value").str.strip_chars())
        .unique()
        .sort("person_key", "system", "value")
        .group_by("person_key", maintain_order=True)
        .agg(identifiers=pl.struct("system", "value"))
    )
    return (
        grouped.join(idents, on="person_key", how="left")
        .with_columns(identifiers=pl.col("identifiers").fill_null(pl.lit([], pl.List(IDENTIFIER))))
        .select(PERSONS.names())
        .cast(PERSONS)
        .sort("person_key")
        .collect()
    )


# --------------------------------------------------------------------------------------------------
# Evaluation and orchestration


def evaluate(
    crosswalk: pl.DataFrame,
    truth_persons: pl.DataFrame,
    *,
    surfaces: tuple[str, str] = ("fhir", "datamodel"),
) -> dict[str, float | int]:
    """Pairwise precision/recall/F1 of cross-surface links against truth.

    ``truth_persons`` has ``person_id``, ``surface``, ``source_patient_id``. A predicted pair is a
    (left-surface record, right-surface record) sharing a person_key; a true pair shares a
    person_id. Only records present in both frames count.
    """
    truth = truth_persons.select(
        "person_id", source_surface=pl.col("surface"), source_id=pl.col("source_patient_id")
    )
    both = crosswalk.select("person_key", "source_surface", "source_id").join(
        truth, on=["source_surface", "source_id"], how="inner"
    )
    left_s, right_s = surfaces

    def pairs(group: str) -> pl.DataFrame:
        lhs = both.filter(pl.col("source_surface") == left_s).select(group, a="source_id")
        rhs = both.filter(pl.col("source_surface") == right_s).select(group, b="source_id")
        return lhs.join(rhs, on=group).select("a", "b").unique()

    predicted = pairs("person_key")
    true = pairs("person_id")
    tp = predicted.join(true, on=["a", "b"], how="inner").height
    fp = predicted.height - tp
    fn = true.height - tp
    precision = tp / predicted.height if predicted.height else 1.0
    recall = tp / true.height if true.height else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    false_merges = (
        both.group_by("person_key").agg(n=pl.col("person_id").n_unique()).filter(pl.col("n") > 1).height
    )
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "true_pairs": true.height,
        "predicted_pairs": predicted.height,
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "false_merge_persons": false_merges,
    }


def split_surfaces(
    patients: pl.DataFrame | pl.LazyFrame, surfaces: tuple[str, str] = ("fhir", "datamodel")
) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """The two inputs of a cross-surface link, from one ``patients`` table."""
    lf = patients.lazy()
    return (
        lf.filter(pl.col("source_surface") == surfaces[0]),
        lf.filter(pl.col("source_surface") == surfaces[1]),
    )


@dataclasses.dataclass(frozen=True)
class IdentityResult:
    """Everything one identity run produces; every frame has its table's schema."""

    model: dict[str, Any] | None  # None when only one surface had records and none was given
    pairs: pl.DataFrame
    links: pl.DataFrame
    review: pl.DataFrame
    crosswalk: pl.DataFrame
    history: pl.DataFrame
    persons: pl.DataFrame

    def summary(self) -> dict[str, int]:
        """Counts only (safe for logs and Dagster metadata): links by method, review size, persons."""
        by_method = self.links.group_by(pl.col("method").str.split(":").list.first()).len()
        out = {f"links_{m}": int(n) for m, n in by_method.iter_rows()}
        out.update(
            candidate_pairs=self.pairs.height,
            links=self.links.height,
            review=self.review.height,
            persons=self.persons.height,
            records=self.crosswalk.height,
            history_events=self.history.height,
        )
        return out


def resolve(
    patients: pl.DataFrame | pl.LazyFrame,
    *,
    now: datetime,
    model: dict[str, Any] | None = None,
    decisions: pl.DataFrame | None = None,
    previous_crosswalk: pl.DataFrame | None = None,
    previous_history: pl.DataFrame | None = None,
    surfaces: tuple[str, str] = ("fhir", "datamodel"),
    systems: Sequence[str] = ENTERPRISE_SYSTEMS,
    link_threshold: float = LINK_THRESHOLD,
    review_threshold: float = REVIEW_THRESHOLD,
    seed: int = 0,
    threads: int | None = None,
    memory_limit: str | None = None,
) -> IdentityResult:
    """The whole identity step over one ``patients`` table: the function an asset calls.

    Trains a model when none is given; pass the previous run's model to keep scores (and so links)
    stable between runs.
    """
    current = latest_versions(patients.lazy()).collect()
    left, right = split_surfaces(current, surfaces)
    sides = current.group_by("source_surface").len()
    both = sides.filter(pl.col("source_surface").is_in(list(surfaces))).height == 2
    if both and model is None:
        try:
            model = train_model(left, right, seed=seed, threads=threads, memory_limit=memory_limit)
        except IdentityError:
            # Too few records for EM to estimate anything (a first sync of a day or two). Shared
            # identifiers still link; the next run, with more records, trains again.
            _log.warning(
                "identity: %d record(s) are too few to train the match model; linking on shared "
                "identifiers only this run",
                current.height,
            )
    if both and model is not None:
        scored = score_pairs(left, right, model, threads=threads, memory_limit=memory_limit)
    else:
        # One surface only (e.g. the first sync of one of them): nothing to link yet, every record
        # is its own person, and a model trained on nothing would be meaningless.
        scored = pl.DataFrame(schema=PAIRS)
    exact = deterministic_links(left, right, systems=systems).collect()
    pairs = pl.concat([exact, scored])
    links, review = decide(
        pairs,
        now=now,
        link_threshold=link_threshold,
        review_threshold=review_threshold,
        decisions=decisions,
    )
    crosswalk, history = cluster(
        current, links, previous_crosswalk, now=now, previous_history=previous_history
    )
    persons = golden_records(current, crosswalk)
    _log.info("identity: %d records, %d links, %d in review", crosswalk.height, links.height, review.height)
    return IdentityResult(
        model=model,
        pairs=pairs,
        links=links,
        review=review,
        crosswalk=crosswalk,
        history=history,
        persons=persons,
    )


def empty(table: str) -> pl.DataFrame:
    """An empty frame with one of this module's table schemas."""
    return pl.DataFrame(schema=TABLES[table])


def conform_patients(frame: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """Cast an outside patient list to the ``patients`` columns identity reads (missing -> null)."""
    lf = frame.lazy()
    have = set(lf.collect_schema().names())
    return lf.select(
        [(pl.col(n) if n in have else pl.lit(None)).cast(t).alias(n) for n, t in PATIENTS.items()]
    )
