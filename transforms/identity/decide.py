"""Decisions: which candidate pairs link, which wait for a person, which are dropped.

Invariants: each record has at most one link; a recorded decision (the latest per pair) beats every
rule; a flagged or ambiguous pair is never linked automatically, it is queued for review.
"""

import math
from datetime import datetime
from typing import Final

import polars as pl

from schema import UTC_TS
from transforms.identity.tables import EVIDENCE, IDENTITY_DECISIONS, IDENTITY_REVIEW, PAIRS, pair_id

# Match-probability thresholds (see docs/identity.md for how they were chosen).
LINK_THRESHOLD: Final = 0.99
REVIEW_THRESHOLD: Final = 0.20
# Two candidates for one record within this many match-weight bits of each other are ambiguous.
AMBIGUITY_MARGIN: Final = 3.0

# Method precedence when one record has several candidate links: a person's decision beats a shared
# identifier, which beats a score.
_METHOD_RANK: Final = {"decision": 0, "identifier": 1, "probabilistic": 2}


def method_rank() -> pl.Expr:
    """The precedence of a pair's ``method`` (0 first): decision, identifier, probabilistic."""
    kind = pl.col("method").str.split(":").list.first()
    return kind.replace_strict(_METHOD_RANK, default=len(_METHOD_RANK), return_dtype=pl.Int32)


def _one_to_one(candidates: pl.DataFrame) -> pl.DataFrame:
    """Greedy one-to-one assignment: repeatedly accept pairs that are the best remaining choice of
    both their records, in (method rank, weight desc, pair_id) order. Equivalent to taking pairs in
    that order and skipping any whose record is already used, but vectorized."""
    order = candidates.with_columns(
        _rank=method_rank(),
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
        decisions.with_columns(pair_id=pair_id())
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
        pairs.with_columns(_rank=method_rank())
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
