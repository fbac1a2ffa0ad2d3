"""Which version of a record wins: the one "newest version per key" rule, for polars and for SQL.

A record (one ``schema.NATURAL_KEY``) can arrive more than once: twice in one batch (a source re-sent
it, a page boundary moved) or again in a later load. The rule:

- versions are ordered by ``NEWEST_FIRST``: the greatest ``source_updated_at`` first, a missing one
  counted as the oldest;
- versions equal on every ordering column go to the later arrival (within a batch, the caller's
  arrival column, e.g. page order; against the lake, the incoming load), so a rerun of a partition
  rewrites it rather than duplicating it;
- against the version already in the lake, an arriving one loses only when it is strictly older on
  values both carry: a missing ``source_updated_at`` on either side says nothing about age, so the
  arrival wins, as on a tie.

Invariant: the batch dedupe (transforms) and the lake merge (resources) pick versions only through
``polars_sort`` and ``sql_strictly_older``, both rendered from the tuples here, so the ordering
columns, their direction and their null handling are written down once.
"""

from collections.abc import Sequence
from typing import Final, Literal, NamedTuple

Direction = Literal["desc", "asc"]
Nulls = Literal["nulls_last", "nulls_first"]
OrderKey = tuple[str, Direction, Nulls]

# Newest first: later source_updated_at first; a version without one sorts after every dated one.
NEWEST_FIRST: Final[tuple[OrderKey, ...]] = (("source_updated_at", "desc", "nulls_last"),)

VERSION_COLUMNS: Final[tuple[str, ...]] = tuple(column for column, _, _ in NEWEST_FIRST)


class PolarsSort(NamedTuple):
    """Arguments for ``DataFrame.sort`` / ``Expr.sort_by``: ``by``, ``descending``, ``nulls_last``."""

    by: list[str]
    descending: list[bool]
    nulls_last: list[bool]


def newest_first(columns: Sequence[str] = VERSION_COLUMNS) -> tuple[OrderKey, ...]:
    """The rule's order over ``columns``, each compared as ``source_updated_at`` is.

    For a surface whose versions rank by more than the timestamp (the Data Model ranks its sources
    ahead of it), so that it names its columns instead of writing an order of its own.
    """
    ((_, direction, nulls),) = NEWEST_FIRST
    return tuple((column, direction, nulls) for column in columns)


def polars_sort(order: Sequence[OrderKey] = NEWEST_FIRST, *, arrival: str) -> PolarsSort:
    """Sort arguments that put the winning version first: ``order``, then the later ``arrival``.

    ``arrival`` is a column that grows with arrival (a row index, a batch sequence) and is unique
    within a key, so the order is total and the first row per key is the winner.
    """
    return PolarsSort(
        by=[column for column, _, _ in order] + [arrival],
        descending=[direction == "desc" for _, direction, _ in order] + [True],
        nulls_last=[nulls == "nulls_last" for _, _, nulls in order] + [True],
    )


def sql_strictly_older(new: str, old: str, order: Sequence[OrderKey] = NEWEST_FIRST) -> str:
    """A SQL boolean: is row ``new`` strictly older than row ``old`` (table aliases)? Never NULL.

    Compared column by column as ``order`` says; a NULL on either side makes the comparison unknown,
    and unknown is "not older", so an arriving version with no timestamp replaces the stored one.
    """
    terms = []
    for i, (column, direction, _) in enumerate(order):
        earlier = [f"{new}.{_ident(c)} = {old}.{_ident(c)}" for c, _, _ in order[:i]]
        op = "<" if direction == "desc" else ">"
        terms.append(" AND ".join([*earlier, f"{new}.{_ident(column)} {op} {old}.{_ident(column)}"]))
    older = terms[0] if len(terms) == 1 else " OR ".join(f"({term})" for term in terms)
    return f"coalesce({older}, false)"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
