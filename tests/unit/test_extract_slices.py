"""A day's FHIR search is cut into disjoint, adjacent slices that together are the whole day."""

import datetime as dt
import itertools
from types import SimpleNamespace
from typing import Any

import pytest

from assets.extract import day_slices

START = dt.datetime(2026, 3, 2, tzinfo=dt.UTC)
END = START + dt.timedelta(days=1)


def _client(slices: int) -> Any:
    return SimpleNamespace(settings=SimpleNamespace(fhir_day_slices=slices))


@pytest.mark.parametrize("count", [1, 3, 4, 7, 96])
def test_slices_cover_the_day_once(count):
    windows = day_slices(START, END, _client(count))
    assert len(windows) == count
    assert windows[0][0] == START and windows[-1][1] == END
    assert all(hi == lo for (_, hi), (lo, _) in itertools.pairwise(windows))
    assert all(lo.microsecond == 0 for lo, _ in windows)
