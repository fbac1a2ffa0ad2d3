"""Persons: links clustered into persons with stable keys, and one golden row per person.

Invariants: a ``person_key`` once issued is never renumbered and never reissued (a merge keeps the
older key and retires the other, a split gives the split-off part a new key), and every change of a
record's person is written to ``person_history``.
"""

import hashlib
from datetime import datetime

import polars as pl

from schema import IDENTIFIER, NATURAL_KEY, UTC_TS
from transforms.identity.decide import method_rank
from transforms.identity.records import latest_versions, normalize_system
from transforms.identity.tables import PAIRS, PERSON_CROSSWALK, PERSON_HISTORY, PERSONS


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
    ).with_columns(_rank=method_rank())
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
