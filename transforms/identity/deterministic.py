"""The deterministic pass: links on an equal identifier of a shared (enterprise or MPI) system.

Invariant: a bare value is never compared without its system, a local MRN system (unique only within
its EHR) is never on the list, and an identifier held by two records of one side links nothing.
"""

from collections.abc import Sequence
from typing import Final

import polars as pl

from transforms.identity.records import latest_versions, normalize_system
from transforms.identity.tables import EVIDENCE, PAIRS, pair_id

# Systems that are shared across EHRs and therefore safe for a deterministic link. The sandbox's
# enterprise MPI OID is the default; a real organization adds its own MPI system here (or passes
# ``systems=``). Local MRN systems must never be listed: an MRN is only unique within its EHR.
ENTERPRISE_SYSTEMS: Final[tuple[str, ...]] = ("urn:oid:2.16.840.1.113883.3.4242.1",)


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
            pair_id=pair_id(),
            match_weight=pl.lit(None, pl.Float64),
            match_probability=pl.lit(1.0),
            evidence=pl.lit([], EVIDENCE),
            flags=pl.lit([], pl.List(pl.String())),
        )
        .select(PAIRS.names())
        .cast(PAIRS)
    )
