"""Times as whole epoch seconds, the form the vectorized generators compute in.

Invariant: converting back always gives an aware UTC datetime at whole seconds.
"""

from datetime import UTC, date, datetime
from typing import Final

DAY: Final = 86_400
EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()


def ts(t: datetime) -> int:
    return int(t.timestamp())


def dt(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def dts(values: list[int | None]) -> list[datetime | None]:
    # Slot-aligned times repeat a lot (a quarter-hour grid over a few months), and datetimes are
    # immutable, so records share one object per instant; the lookup runs in C (map over dict.get).
    cache: dict[int | None, datetime | None] = {x: dt(x) for x in set(values) if x is not None}
    cache[None] = None
    return list(map(cache.__getitem__, values))
