"""A run waiting for a Dagster pool slot sleeps between its slot checks instead of spinning a core.

Dagster's step loop sleeps for ``InstanceConcurrencyContext.interval_to_next_pending_claim_check()``,
which returns ``min([0, ...])``: never more than 0. A run whose step waits for a slot (a backfill's
warm runs wait minutes for an `redox_extract` slot; loads wait for the single `warehouse` slot)
therefore loops without sleeping and spends a whole CPU core doing nothing (measured in
docs/benchmarks.md: 21.7 CPU-seconds in a 21 s wait). Dagster already spaces the slot checks
themselves (1 s, growing to 15 s); only the sleep in between was lost.

Invariant: when a slot is checked is Dagster's own schedule, unchanged. The loop sleeps until the
next check is due, never longer than ``MAX_SLEEP_S``, so an executor that also polls other steps
(Celery) notices them within a second. ``apply`` refuses to run if a Dagster upgrade removed what
it replaces, rather than silently leaving the spin in place.
"""

import time
from typing import Final

from dagster._core.execution.plan import instance_concurrency_context as concurrency

MAX_SLEEP_S: Final = 1.0


def interval_to_next_pending_claim_check(self: concurrency.InstanceConcurrencyContext) -> float:
    """Seconds until the earliest pending slot check is due (0 when one is due), at most MAX_SLEEP_S."""
    timeouts = self._pending_timeouts.values()
    if not self._pending_claims or not timeouts:
        return 0.0
    return min(MAX_SLEEP_S, max(0.0, min(timeouts) - time.time()))


def apply() -> None:
    """Replace Dagster's interval with this module's (idempotent)."""
    cls = concurrency.InstanceConcurrencyContext
    if not hasattr(cls, "interval_to_next_pending_claim_check") or not hasattr(cls, "has_pending_claims"):
        raise SystemExit(
            "dagster's InstanceConcurrencyContext no longer has interval_to_next_pending_claim_check "
            "(a Dagster upgrade changed it): update pipelines/pool_wait.py"
        )
    cls.interval_to_next_pending_claim_check = interval_to_next_pending_claim_check  # type: ignore[method-assign]
