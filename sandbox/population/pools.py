"""Name pools the generators draw from: ``sandbox.names`` lists without repeats.

Invariant: first-seen order is kept, so a popularity rank (most common first) drawn into a pool
always names the same string for the same seed.
"""

from collections.abc import Sequence
from typing import Final

from sandbox import names


def _uniq(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


MALE: Final = _uniq(names.MALE_GIVEN)
FEMALE: Final = _uniq(names.FEMALE_GIVEN)
FAMILY: Final = _uniq(names.FAMILY)
SIMPLE_FAMILY: Final = tuple(f for f in FAMILY if f.isalpha())
