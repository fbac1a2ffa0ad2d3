"""What two patient lists can feed: the comparisons, blocking rules and training sessions of the
match model that have data on both sides, and why each other one is left out.

An outside list rarely has every column: one has no sex, phone or email, another has no SSN, or
holds ids that are not US SSNs. A comparison with no value on one side only ever says "missing",
a blocking rule on an empty column finds no pair, and an EM session that finds no pair stops
Splink's training. So the model is narrowed to what the data can feed, and the rest is reported.

Invariants:
- a comparison is kept when some pair can leave its ``missing`` level (a column of that level holds
  a usable value on both sides); a blocking rule when every column it reads holds a value on its
  side; an EM session when, in addition, at least one pair of records agrees on its rule;
- everything left out is listed with its reason in the input's column names (``given_name``,
  ``ssn``...) and counts, never a record value;
- too little left to train a meaningful model raises ``IdentityError`` naming the columns.
"""

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import polars as pl

from transforms.identity.comparisons import BLOCKING_RULES, COMPARISONS, EM_RULES
from transforms.identity.errors import IdentityError
from transforms.identity.features import FEATURE_COLUMNS, FEATURE_SOURCES

#: Fewest comparisons a model is trained on: with fewer, EM has too little to tell matches from
#: non-matches (two fields are not enough to identify a two-class mixture without labels).
MIN_COMPARISONS: Final = 3

_SIDE_COLUMN: Final = re.compile(r"\b([lr])\.(\w+)\b")
_SUFFIXED: Final = re.compile(r"\b(\w+)_[lr]\b")
_EQUALITY: Final = re.compile(r"^\s*l\.(\w+)\s*=\s*r\.(\w+)\s*$")


@dataclasses.dataclass(frozen=True)
class SideStats:
    """Counts of one input (no values): rows, non-null input columns, non-null features."""

    rows: int
    present: Mapping[str, int]  # input column -> records holding a value
    usable: Mapping[str, int]  # feature column -> records whose value survived normalization


def side_stats(records: pl.DataFrame, feature_frame: pl.DataFrame) -> SideStats:
    """The counts of one side: ``records`` as given (latest versions), ``feature_frame`` their features."""
    sources = sorted(set(FEATURE_SOURCES.values()) & set(records.columns))
    present = records.select(pl.col(sources).count()).row(0, named=True) if sources else {}
    usable = feature_frame.select(pl.col(list(FEATURE_COLUMNS)).count()).row(0, named=True)
    return SideStats(rows=records.height, present=present, usable=usable)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The parts of the model two inputs can feed, and the parts left out (JSON-ready dicts with
    ``part``, ``name``, ``columns`` and ``reason``)."""

    comparisons: tuple[dict[str, Any], ...]
    blocking_rules: tuple[str, ...]
    em_rules: tuple[str, ...]
    left_out: tuple[dict[str, Any], ...]


def _sources(features: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(FEATURE_SOURCES[f] for f in features))


def _null_features(comparison: dict[str, Any]) -> list[str]:
    null = next(lv for lv in comparison["comparison_levels"] if lv.get("is_null_level"))
    return list(dict.fromkeys(_SUFFIXED.findall(null["sql_condition"])))


def _rule_features(rule: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"l": [], "r": []}
    for side, feature in _SIDE_COLUMN.findall(rule):
        if feature not in out[side]:
            out[side].append(feature)
    return out


class _Sides:
    """The two inputs' counts, and how to say what a column lacks on them."""

    def __init__(self, left: SideStats, right: SideStats) -> None:
        self.stats = {"l": left, "r": right}

    def has(self, side: str, feature: str) -> bool:
        return self.stats[side].usable.get(feature, 0) > 0

    def both(self, feature: str) -> bool:
        return self.has("l", feature) and self.has("r", feature)

    def _lack(self, side: str, source: str) -> tuple[str, str] | None:
        present = self.stats[side].present.get(source, 0)
        if any(self.has(side, f) for f, s in FEATURE_SOURCES.items() if s == source):
            return None
        if present == 0:
            return "empty", ""
        return "no usable value", f" ({present:,} present, none valid)"

    def why(self, source: str) -> str:
        """What ``source`` lacks: 'empty on both sides', 'no usable value on the right (...)'."""
        left, right = self._lack("l", source), self._lack("r", source)
        if left is not None and left == right:
            return f"{source}: {left[0]} on both sides{left[1]}"
        said = [
            f"{lack[0]} on the {name}{lack[1]}" for lack, name in ((left, "left"), (right, "right")) if lack
        ]
        return f"{source}: {', '.join(said) if said else 'no value on one side where the other has one'}"


def _pair_count(left: pl.DataFrame, right: pl.DataFrame, on: list[tuple[str, str]]) -> int:
    """How many (left, right) pairs agree on every (left column, right column) of ``on``: counted per
    key, never materialized (a birth-date rule on a million records pairs tens of millions)."""
    lcols, rcols = [a for a, _ in on], [b for _, b in on]
    lhs = left.select(lcols).drop_nulls().group_by(lcols).agg(n_l=pl.len().cast(pl.Int64))
    rhs = right.select(rcols).drop_nulls().group_by(rcols).agg(n_r=pl.len().cast(pl.Int64))
    joined = lhs.join(rhs, left_on=lcols, right_on=rcols)
    return int(joined.select((pl.col("n_l") * pl.col("n_r")).sum()).item() or 0)


def _equalities(rule: str) -> list[tuple[str, str]]:
    terms = re.split(r"\s+AND\s+", rule, flags=re.IGNORECASE)
    matches = [_EQUALITY.match(t) for t in terms]
    if not all(matches):
        raise ValueError(f"EM rule is not a conjunction of l.X = r.Y equalities: {rule}")
    return [(m.group(1), m.group(2)) for m in matches if m]


def _describe_rules(rules: Sequence[str]) -> str:
    described = []
    for rule in rules:
        sides = _rule_features(rule)
        described.append(" + ".join(_sources([*sides["l"], *sides["r"]])))
    return "; ".join(dict.fromkeys(described))


def plan(
    left: SideStats,
    right: SideStats,
    left_features: pl.DataFrame,
    right_features: pl.DataFrame,
    *,
    comparisons: Sequence[dict[str, Any]] = COMPARISONS,
    blocking_rules: Sequence[str] = BLOCKING_RULES,
    em_rules: Sequence[str] = EM_RULES,
) -> Plan:
    """The comparisons, blocking rules and EM sessions the two inputs can feed.

    Raises ``IdentityError`` naming the columns when fewer than ``MIN_COMPARISONS`` comparisons, no
    blocking rule or no EM session is left.
    """
    sides = _Sides(left, right)
    left_out: list[dict[str, Any]] = []

    def leave_out(part: str, name: str, sources: list[str], reason: str) -> None:
        left_out.append({"part": part, "name": name, "columns": sources, "reason": reason})

    kept_comparisons: list[dict[str, Any]] = []
    for comparison in comparisons:
        needed = _null_features(comparison)
        sources = _sources(needed)
        if any(sides.both(f) for f in needed):
            kept_comparisons.append(comparison)
        else:
            why = "; ".join(sides.why(s) for s in sources)
            leave_out("comparison", comparison["output_column_name"], sources, why)

    def lacking(rule: str) -> tuple[list[str], str | None]:
        features = _rule_features(rule)
        sources = _sources([*features["l"], *features["r"]])
        missing = [f for side in ("l", "r") for f in features[side] if not sides.has(side, f)]
        if not missing:
            return sources, None
        return sources, "; ".join(sides.why(s) for s in _sources(missing))

    kept_blocking: list[str] = []
    for rule in blocking_rules:
        sources, reason = lacking(rule)
        if reason is None:
            kept_blocking.append(rule)
        else:
            leave_out("blocking rule", rule, sources, reason)

    kept_em: list[str] = []
    for rule in em_rules:
        sources, reason = lacking(rule)
        if reason is None and _pair_count(left_features, right_features, _equalities(rule)) == 0:
            reason = f"no pair of records agrees on {' and '.join(sources)}"
        if reason is None:
            kept_em.append(rule)
        else:
            leave_out("training session", rule, sources, reason)

    problems = []
    if len(kept_comparisons) < MIN_COMPARISONS:
        problems.append(
            f"only {len(kept_comparisons)} comparison(s) have data on both sides, "
            f"and a model needs at least {MIN_COMPARISONS}"
        )
    if not kept_blocking:
        problems.append(
            f"no rule to find candidate pairs can run (each needs one of: {_describe_rules(blocking_rules)})"
        )
    if not kept_em:
        problems.append(
            "no training session can run (each needs records agreeing on one of: "
            f"{_describe_rules(em_rules)})"
        )
    if problems:
        usable = [
            s for s in dict.fromkeys(FEATURE_SOURCES.values()) if any(sides.both(f) for f in _features_of(s))
        ]
        unusable = [
            sides.why(s)
            for s in dict.fromkeys(FEATURE_SOURCES.values())
            if not any(sides.both(f) for f in _features_of(s))
        ]
        raise IdentityError(
            f"too few columns usable on both sides to link: {'; '.join(problems)}. "
            f"Usable on both sides: {', '.join(usable) or 'none'}. "
            f"Not usable: {'; '.join(unusable)}. "
            "Give both lists given_name, family_name and birth_date at least (an SSN or national id "
            "in ssn, an address, phone or email make links surer), or score them with a model "
            "trained on fuller lists."
        )
    return Plan(
        comparisons=tuple(kept_comparisons),
        blocking_rules=tuple(kept_blocking),
        em_rules=tuple(kept_em),
        left_out=tuple(left_out),
    )


def _features_of(source: str) -> list[str]:
    return [f for f, s in FEATURE_SOURCES.items() if s == source]
