"""Identifier systems and the id maps that hand out MRNs, visit and order numbers, enterprise ids,
SSNs and NPIs.

Invariant: an id map is a keyed bijection on its space, so a running counter gives ids that never
collide and look random; the same seed gives the same maps (``Ids.of``), whoever asks first.
"""

import dataclasses
import random
from typing import Final

import polars as pl

from sandbox.model import Surface

# -- identifier systems ---------------------------------------------------------------------------

FHIR_MRN: Final = "urn:redox:fhir-ehr:MR"
DM_MRN: Final = "urn:redox:dm:MR"
DM_EHRID: Final = "urn:redox:dm:EHRID"
ENTERPRISE_OID: Final = "2.16.840.1.113883.3.4242.1"
ENTERPRISE: Final = f"urn:oid:{ENTERPRISE_OID}"
SURFACES: Final[tuple[Surface, Surface]] = ("fhir", "datamodel")


# Unique-id spaces: a keyed bijection on [0, n) (see Perm) turns a running counter into ids that are
# collision-free and look random, with no set of used ids to keep.
_MRN_SPACE: Final = 90_000_000  # 8-digit MRNs: FHIR takes even slots, Data Model odd ones
_VISIT_SPACE: Final = 900_000_000  # 9-digit VisitNumbers: encounters even, appointments odd
_ORDER_SPACE: Final = 900_000_000
_ENTERPRISE_SPACE: Final = 9_000_000_000
_SSN_SPACE: Final = 100 * 99 * 9999  # area 900-999, group 01-99, serial 0001-9999
_NPI_SPACE: Final = 900_000_000


_MIX: Final = 0x9E3779B1  # odd, golden-ratio multiplier: multiply mod 2**32, keep the high bits


@dataclasses.dataclass(frozen=True)
class Perm:
    """A keyed pseudo-random bijection on [0, n): a four-round Feistel network on the smallest even
    number of bits that covers n, with values that land at or above n walked again until they fall
    inside (format-preserving encryption's cycle walking). Unlike an affine map, consecutive
    counters give unrelated ids, so ids leak neither order nor which copies were made together."""

    n: int
    half: int
    keys: tuple[int, ...]

    def _once(self, x: int) -> int:
        h = self.half
        left, right = x >> h, x & ((1 << h) - 1)
        for k in self.keys:
            left, right = right, left ^ ((((right + k) * _MIX) & 0xFFFFFFFF) >> (32 - h))
        return (left << h) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise ValueError("identifier space exhausted")
        x = self._once(i)
        while x >= self.n:
            x = self._once(x)
        return x

    def _once_series(self, x: pl.Series) -> pl.Series:
        h = self.half
        left, right = x // (1 << h), x % (1 << h)
        for k in self.keys:
            left, right = right, left ^ ((((right + k) * _MIX) % (1 << 32)) // (1 << (32 - h)))
        return left * (1 << h) + right

    def series(self, i: pl.Series) -> pl.Series:
        x = self._once_series(i.cast(pl.Int64))
        while True:
            outside = x >= self.n
            if not outside.any():
                return x
            x = pl.select(
                pl.when(pl.lit(outside)).then(pl.lit(self._once_series(x))).otherwise(pl.lit(x))
            ).to_series()


def _perm(rng: random.Random, n: int) -> Perm:
    bits = max(2, (n - 1).bit_length())
    half = (bits + 1) // 2
    return Perm(n, half, tuple(rng.getrandbits(half) for _ in range(4)))


@dataclasses.dataclass(frozen=True)
class Ids:
    """The id maps of one seed; shared by build, advance and the fast frame path."""

    mrn: Perm
    visit: Perm
    order: dict[str, Perm]
    enterprise: Perm
    ssn: Perm
    npi: Perm

    @classmethod
    def of(cls, seed: int) -> "Ids":
        rng = random.Random(f"redox-sandbox:{seed}:ids")
        return cls(
            mrn=_perm(rng, _MRN_SPACE),
            visit=_perm(rng, _VISIT_SPACE),
            order={"fhir": _perm(rng, _ORDER_SPACE), "datamodel": _perm(rng, _ORDER_SPACE)},
            enterprise=_perm(rng, _ENTERPRISE_SPACE),
            ssn=_perm(rng, _SSN_SPACE),
            npi=_perm(rng, _NPI_SPACE),
        )
