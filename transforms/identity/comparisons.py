"""The untrained Splink model: comparison levels with their prior m values, blocking rules, EM rules.

Invariant: SQL here reads only ``FEATURE_COLUMNS`` (suffixed ``_l``/``_r``); every comparison lists
its levels most specific first and ends in ``ELSE``, so each pair falls in exactly one level.
"""

import copy
from collections.abc import Sequence
from typing import Any, Final


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
    # The column holds a US SSN or another country's national id (see features._national_id). A
    # slip is tolerated only between two SSNs, whose format is known; any other id is exact or not.
    ssn = {
        "output_column_name": "ssn",
        "comparison_description": "SSN or national id: exact; two SSNs one digit or transposition apart",
        "comparison_levels": [
            _null("ssn"),
            _level("ssn_l = ssn_r", "exact", 0.9),
            _level(
                f"regexp_full_match(ssn_l, '[0-9]{{9}}') AND regexp_full_match(ssn_r, '[0-9]{{9}}') "
                f"AND ({_one_edit('ssn')})",
                "one edit",
                0.05,
            ),
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


#: Every comparison of the full model, in model order.
COMPARISONS: Final[tuple[dict[str, Any], ...]] = tuple(_comparisons())


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
EM_RULES: Final[tuple[str, ...]] = (
    "l.dob = r.dob AND l.family_sx = r.family_sx",
    "l.given = r.given AND l.family = r.family",
    "l.ssn = r.ssn",
)


def settings(
    *,
    probability_two_random_records_match: float = 1e-4,
    comparisons: Sequence[dict[str, Any]] = COMPARISONS,
    blocking_rules: Sequence[str] = BLOCKING_RULES,
) -> dict[str, Any]:
    """The untrained Splink settings: comparisons, blocking rules, column names. ``comparisons`` and
    ``blocking_rules`` narrow the model to what two inputs can feed (see ``usable.plan``)."""
    return {
        "link_type": "link_only",
        "unique_id_column_name": "rid",
        "probability_two_random_records_match": probability_two_random_records_match,
        "comparisons": copy.deepcopy(list(comparisons)),
        "blocking_rules_to_generate_predictions": [
            {"blocking_rule": rule, "sql_dialect": "duckdb"} for rule in blocking_rules
        ],
        "retain_matching_columns": True,
        "retain_intermediate_calculation_columns": True,
        "em_convergence": 0.001,
        "max_iterations": 25,
    }
