"""``dagster-daemon run`` for one ``redox-etl backfill`` command, with the intervals such a daemon wants.

Dagster's daemon is built to live for weeks: its backfill loop ticks every 30 s, and every 60 s it
restarts its code server so that new code is picked up. The daemon pipelines/runner.py starts lives
only as long as one backfill command, so both cost it time and nothing else: a backfill waits up to
a tick before its unpartitioned identity run is submitted (the command itself notices the end, see
``runner.landed``), and each restart re-imports the definitions the command is running anyway (about 7 CPU-seconds a minute, on two cores shared with the runs). This entry point
shortens the tick, stops the restarts, then hands over to Dagster's own CLI unchanged.

Invariant: only those two intervals differ from ``dagster-daemon run``. Both are module constants
Dagster reads at each use (``dagster._daemon.controller``); if an upgrade renames either, the
daemon refuses to start with a message naming it rather than silently keeping the defaults
(tests/unit/test_command_daemon.py checks both are still read).
"""

from typing import Final

import dagster._daemon.controller as controller
from dagster._daemon.cli import main as dagster_daemon_main

from pipelines.signals import restore_interrupt

# Each backfill tick re-evaluates the whole backfill (about a CPU-second at 20+ day-runs): every
# 10 s bounds that to a tenth of a core while cutting the waits a 30 s tick adds to a command.
BACKFILL_TICK_S: Final = 10
# The command's code does not change while it runs: one code server for its whole life.
RELOAD_WORKSPACE_S: Final = 7 * 24 * 3600

INTERVALS: Final = {
    "DEFAULT_DAEMON_INTERVAL_SECONDS": BACKFILL_TICK_S,
    "RELOAD_WORKSPACE_INTERVAL": RELOAD_WORKSPACE_S,
}


def configure() -> None:
    """Set the intervals on Dagster's daemon controller; refuse if one no longer exists there."""
    for name, value in INTERVALS.items():
        if not hasattr(controller, name):
            raise SystemExit(
                f"dagster._daemon.controller has no {name} (a Dagster upgrade renamed it): "
                "update pipelines/command_daemon.py before running a backfill with this Dagster"
            )
        setattr(controller, name, value)


def main() -> None:
    configure()
    # Dagster's daemon CLI maps SIGTERM to SIGINT's handler at start: an ignored SIGINT (a backfill
    # started by cron) would make the daemon deaf to the command's terminate().
    restore_interrupt()
    dagster_daemon_main()


if __name__ == "__main__":
    main()
