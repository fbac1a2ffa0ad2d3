"""One identity run over a ``patients`` table: the function the asset calls, and what it returns.

Invariant: every frame of ``IdentityResult`` has its table's schema, and the run logs counts only.
"""

import dataclasses
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import polars as pl

from transforms.identity.decide import LINK_THRESHOLD, REVIEW_THRESHOLD, decide
from transforms.identity.deterministic import ENTERPRISE_SYSTEMS, deterministic_links
from transforms.identity.errors import IdentityError
from transforms.identity.model import score_pairs, train_model
from transforms.identity.persons import cluster, golden_records
from transforms.identity.records import latest_versions, split_surfaces
from transforms.identity.tables import PAIRS

_log = logging.getLogger(__name__)


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
        except IdentityError as err:
            # Typically too few records for EM to estimate anything (a first sync of a day or two).
            # Shared identifiers still link; the next run, with more records, trains again. The
            # message names columns and rules only (IdentityError's invariant).
            _log.warning(
                "identity: cannot train the match model on %d record(s), linking on shared "
                "identifiers only this run: %s",
                current.height,
                err,
            )
        else:
            for part in model.get("left_out", []):
                _log.info(
                    "identity: %s %s left out of the model: %s", part["part"], part["name"], part["reason"]
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
