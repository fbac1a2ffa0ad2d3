"""Random draws shared by the generators: vectors of draws from one ``random.Random``, Poisson
counts, popularity weights, and rows repeated by drawn counts.

Invariant: every draw comes from the ``random.Random`` passed in, in call order; nothing reads the
global random state or numpy, so a seeded stream gives the same values everywhere.
"""

import itertools
import math
import random
from collections.abc import Sequence

import polars as pl
import pyarrow as pa

# -- vector draws ---------------------------------------------------------------------------------


class Vec:
    """Vectors of draws from a ``random.Random`` (no numpy here): ``getrandbits`` fills a buffer that
    Arrow reads as an array, so a million draws cost one call."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def _words(self, n: int, width: int, dtype: pa.DataType) -> pl.Series:
        if n == 0:
            return pl.from_arrow(pa.array([], type=dtype))  # type: ignore[return-value]
        raw = self.rng.getrandbits(8 * width * n).to_bytes(width * n, "little")
        array = pa.Array.from_buffers(dtype, n, [None, pa.py_buffer(raw)])
        return pl.from_arrow(array)  # type: ignore[return-value]

    def u(self, n: int) -> pl.Series:
        """Uniform floats in [0, 1)."""
        return self._words(n, 4, pa.uint32()).cast(pl.Float64) / 4294967296.0

    def ints(self, n: int, lo: int, hi: int) -> pl.Series:
        """Uniform integers in [lo, hi)."""
        return (self.u(n) * (hi - lo)).floor().cast(pl.Int64) + lo

    def weighted(self, n: int, weights: Sequence[float]) -> pl.Series:
        """Indexes into ``weights``, drawn in proportion to them."""
        cum = [float(c) for c in itertools.accumulate(weights)]
        idx = pl.Series(cum, dtype=pl.Float64).search_sorted(self.u(n) * cum[-1], side="right")
        return idx.clip(0, len(weights) - 1).cast(pl.Int64)

    def uuids(self, n: int) -> pl.Series:
        """Random (version 4 layout) UUID strings."""
        hexes = self._words(n, 16, pa.binary(16)).bin.encode("hex")
        variant = pl.Series(list("89ab")).gather(self.ints(n, 0, 4))
        frame = pl.DataFrame({"h": hexes, "v": variant})
        h = pl.col("h").str
        return frame.select(
            pl.concat_str(
                [
                    h.slice(0, 8),
                    pl.lit("-"),
                    h.slice(8, 4),
                    pl.lit("-4"),
                    h.slice(13, 3),
                    pl.lit("-"),
                    pl.col("v"),
                    h.slice(17, 3),
                    pl.lit("-"),
                    h.slice(20, 12),
                ]
            )
        ).to_series()


def zipf(n: int, flatten: float) -> list[float]:
    """Popularity weights for a list ordered most common first."""
    return [1.0 / (rank + flatten) for rank in range(n)]


def poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 50:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def poisson_vec(v: Vec, n: int, lam: float) -> pl.Series:
    """``n`` Poisson(lam) counts by inverse CDF (one lambda for all rows)."""
    cdf, term, k = [], math.exp(-lam), 0
    total = term
    while total < 1 - 1e-12 and k < 1000:
        cdf.append(total)
        k += 1
        term *= lam / k
        total += term
    cdf.append(1.0)
    return pl.Series(cdf).search_sorted(v.u(n), side="right").cast(pl.Int64).clip(0, len(cdf) - 1)


def repeat(owners: pl.DataFrame, counts: pl.Series) -> pl.DataFrame:
    """Each owner row repeated ``counts`` times, in order."""
    index = pl.int_range(owners.height, eager=True).repeat_by(counts).explode().drop_nulls()
    return owners[index]


def const(n: int, value: int) -> pl.Series:
    return pl.repeat(value, n, dtype=pl.Int64, eager=True)
