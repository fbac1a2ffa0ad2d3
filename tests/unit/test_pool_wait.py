"""A run waiting for a pool slot sleeps until its next slot check instead of spinning (pipelines/pool_wait.py).

The interval is read off a real ``InstanceConcurrencyContext`` holding one pending claim; no timing
is asserted. Dagster's own interval is checked in a fresh interpreter, where nothing replaced it, so
the day an upgrade fixes it upstream this module says the replacement can go.
"""

import collections
import subprocess
import sys
import time

from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext

import pipelines.definitions  # noqa: F401  (the code location applies the replacement on import)
from pipelines import pool_wait

WAITING = """
import time
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
context = object.__new__(InstanceConcurrencyContext)
context._pending_claims = {"extract"}
context._pending_timeouts = {"extract": time.time() + 5}
print(context.interval_to_next_pending_claim_check())
"""


def _waiting(due_in: float | None) -> InstanceConcurrencyContext:
    context = object.__new__(InstanceConcurrencyContext)
    context._pending_claims = {"extract"} if due_in is not None else set()
    context._pending_timeouts = collections.defaultdict(float)
    if due_in is not None:
        context._pending_timeouts["extract"] = time.time() + due_in
    return context


def test_dagsters_own_interval_never_lets_a_waiting_run_sleep() -> None:
    done = subprocess.run([sys.executable, "-c", WAITING], capture_output=True, text=True, check=True)
    assert float(done.stdout) <= 0, "Dagster sleeps between slot checks now: pipelines/pool_wait.py can go"


def test_the_code_location_makes_a_waiting_run_sleep_until_its_next_check() -> None:
    assert (
        InstanceConcurrencyContext.interval_to_next_pending_claim_check
        is pool_wait.interval_to_next_pending_claim_check
    )
    # A check due in 5 s: sleep, but wake within MAX_SLEEP_S (an executor may poll other steps).
    assert 0 < _waiting(5).interval_to_next_pending_claim_check() <= pool_wait.MAX_SLEEP_S
    # Due in 0.2 s: sleep just that long.
    assert 0 < _waiting(0.2).interval_to_next_pending_claim_check() <= 0.2
    # Overdue, or nothing pending: no sleep.
    assert _waiting(-1).interval_to_next_pending_claim_check() == 0
    assert _waiting(None).interval_to_next_pending_claim_check() == 0
    pool_wait.apply()  # idempotent
    assert (
        InstanceConcurrencyContext.interval_to_next_pending_claim_check
        is pool_wait.interval_to_next_pending_claim_check
    )
