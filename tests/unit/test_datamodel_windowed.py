"""``DataModelClient.windowed``: a window Redox refuses (413) or times out on (504) is split in
halves, deterministically, until each answer fits; the replies cover the window once, in order."""

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from resources.redox.datamodel import DataModelClient, DataModelReply
from resources.redox.errors import RedoxDataModelError, RedoxRequestError
from resources.redox.transport import FINAL_STATUSES

START = datetime(2026, 3, 2, tzinfo=UTC)
END = START + timedelta(days=1)


class Fake(DataModelClient):
    """Answers any window up to ``fits`` long; longer ones fail with ``status``."""

    def __init__(self, fits: timedelta, status: int = 413) -> None:
        self.fits = fits
        self.status = status
        self.asked: list[tuple[datetime, datetime]] = []
        self.final_during: list[frozenset[int]] = []

    async def _answer(self, name: str, start: datetime, end: datetime) -> DataModelReply:
        self.asked.append((start, end))
        self.final_during.append(FINAL_STATUSES.get())
        if end - start > self.fits:
            raise RedoxDataModelError(
                endpoint=f"POST /endpoint ({name})", texts=["too big"], status=self.status
            )
        return DataModelReply("X", name, "POST /endpoint", b"{}", {"start": start, "end": end})

    async def results_query(self, *, start: datetime, end: datetime, **_: Any) -> DataModelReply:
        return await self._answer("Results.Query", start, end)

    async def visit_query(self, *, start: datetime, end: datetime) -> DataModelReply:
        return await self._answer("PatientAdmin.VisitQuery", start, end)


def _windows(replies: list[DataModelReply]) -> list[tuple[datetime, datetime]]:
    return [(r.json["start"], r.json["end"]) for r in replies]


def test_a_window_that_fits_is_one_query():
    client = Fake(fits=timedelta(days=2))
    replies = asyncio.run(client.windowed("Results.Query", start=START, end=END))
    assert _windows(replies) == [(START, END)] == client.asked


@pytest.mark.parametrize("status", [413, 504])
def test_refused_windows_split_in_halves_in_order(status):
    client = Fake(fits=timedelta(hours=5), status=status)
    replies = asyncio.run(client.windowed("Results.Query", start=START, end=END))
    windows = _windows(replies)
    assert windows == [
        (START + timedelta(hours=3 * i), START + timedelta(hours=3 * (i + 1))) for i in range(8)
    ]
    # 1 day, 2 halves, 4 quarters refused; 8 eighths answered.
    assert len(client.asked) == 1 + 2 + 4 + 8
    # The transport was told not to retry 413/504 itself, only for these calls.
    assert all({413, 504} <= final for final in client.final_during)
    assert FINAL_STATUSES.get() == frozenset()


def test_the_same_refusals_give_the_same_windows():
    runs = [
        asyncio.run(Fake(fits=timedelta(hours=7)).windowed("PatientAdmin.VisitQuery", start=START, end=END))
    ]
    runs.append(
        asyncio.run(Fake(fits=timedelta(hours=7)).windowed("PatientAdmin.VisitQuery", start=START, end=END))
    )
    assert _windows(runs[0]) == _windows(runs[1])


def test_odd_windows_split_at_whole_milliseconds_and_stay_contiguous():
    end = START + timedelta(milliseconds=86_399_999)
    replies = asyncio.run(Fake(fits=timedelta(hours=4)).windowed("Results.Query", start=START, end=end))
    windows = _windows(replies)
    assert windows[0][0] == START and windows[-1][1] == end
    assert all(a[1] == b[0] for a, b in itertools.pairwise(windows))
    assert all(w[0].microsecond % 1000 == 0 for w in windows)


def test_below_the_minimum_window_the_servers_error_is_raised():
    client = Fake(fits=timedelta(minutes=10))
    with pytest.raises(RedoxDataModelError, match="too big") as caught:
        asyncio.run(client.windowed("Results.Query", start=START, end=END, min_window=timedelta(hours=1)))
    assert caught.value.status == 413
    # Halved while the halves stay >= 1 h: 24 h, 12 h, 6 h, 3 h, 1.5 h; the first 1.5 h window fails.
    assert client.asked[-1][1] - client.asked[-1][0] == timedelta(minutes=90)


def test_other_errors_are_not_split():
    client = Fake(fits=timedelta(0), status=400)
    with pytest.raises(RedoxRequestError) as caught:
        asyncio.run(client.windowed("Results.Query", start=START, end=END))
    assert caught.value.status == 400 and len(client.asked) == 1


def test_unknown_queries_and_empty_windows_are_refused():
    with pytest.raises(ValueError, match="windowed answers"):
        asyncio.run(Fake(fits=END - START).windowed("PatientSearch.Query", start=START, end=END))
    with pytest.raises(ValueError, match="start < end"):
        asyncio.run(Fake(fits=END - START).windowed("Results.Query", start=END, end=START))


def test_pieces_ask_the_known_size_at_once_and_still_split_what_does_not_fit():
    client = Fake(fits=timedelta(hours=5))
    replies = asyncio.run(client.windowed("Results.Query", start=START, end=END, pieces=4))
    # Four 6-hour windows asked first, each refused once and halved: no whole-day refusal first.
    assert (START, END) not in client.asked
    assert _windows(replies) == [
        (START + timedelta(hours=3 * i), START + timedelta(hours=3 * (i + 1))) for i in range(8)
    ]
    assert len(client.asked) == 4 + 8


def test_pieces_never_cut_below_the_smallest_window():
    client = Fake(fits=timedelta(days=2))
    replies = asyncio.run(
        client.windowed("Results.Query", start=START, end=END, pieces=1000, min_window=timedelta(hours=6))
    )
    assert len(replies) == 4
    assert _windows(replies)[0][0] == START and _windows(replies)[-1][1] == END
