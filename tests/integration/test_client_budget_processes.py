"""Two OS processes share one SQLite budget against a sandbox with a small limit: never a 429.

The sandbox runs in its own process (``serve_in_subprocess``) and counts, per client IP, the most
requests it ever saw inside one rolling window; that count, not the client's own bookkeeping, is
what this test holds to the limit.

The margin is 0.95 here, not the default 0.97: the sandbox counts a request when its (busy, shared
CPU) event loop handles it, which was measured to put up to ~8 more requests in a 20 s window than
the client sent in it. At 300 per 20 s a 3 % margin is 9 requests; at Redox's 7,500 per 300 s it is
225, and the same lag is immaterial.
"""

import pytest

from bench.budget import run_phase

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT, WINDOW = 300, 20.0


def test_two_processes_share_one_budget_without_a_429():
    result = run_phase(
        "budgeted",
        processes=2,
        limit=LIMIT,
        window=WINDOW,
        windows=1.5,  # more than one window, so the rolling window really rolls
        margin=0.95,
        concurrency=6,
        backoff=1.0,
        patients=20,
    )
    assert result["server_429"] == 0 and result["received_429"] == 0
    assert result["server_peak_in_window"] <= LIMIT
    # And the budget was spent, not merely respected: both processes together kept close to it.
    assert result["fraction_of_limit"] >= 0.85, result
