"""The frames identity produces and reads: their schemas, the id that names a pair, empty tables.

Invariant: every frame a step of the identity package returns is cast to one of these schemas, and
a pair has one ``pair_id`` whichever record is on the left, so a decision recorded either way round
finds its pair.
"""

import hashlib
from typing import Final

import polars as pl

from schema import IDENTIFIER, UTC_TS

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


def pair_id() -> pl.Expr:
    """An orientation-free id for a pair, so a decision recorded either way round finds its pair."""
    a = pl.concat_str("left_surface", "left_id", separator="\x1f")
    b = pl.concat_str("right_surface", "right_id", separator="\x1f")
    lo = pl.min_horizontal(a, b)
    hi = pl.max_horizontal(a, b)
    return pl.concat_str(lo, hi, separator="\x1e").map_batches(
        lambda s: pl.Series([hashlib.sha256(v.encode()).hexdigest()[:24] for v in s], dtype=pl.String()),
        return_dtype=pl.String(),
    )


def empty(table: str) -> pl.DataFrame:
    """An empty frame with one of identity's table schemas (``TABLES``)."""
    return pl.DataFrame(schema=TABLES[table])
