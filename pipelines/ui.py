"""``dagster dev`` for ``make ui``, in a process that does not keep signal dispositions it inherited.

``nohup make ui &``, cron and supervisors that start commands in the background hand them SIGINT
ignored. ``dagster dev`` maps SIGTERM to SIGINT's handler, so such a UI ignored SIGTERM as well:
``kill`` left it serving, and its webserver and daemon (which inherit the same) with it
(pipelines/signals.py explains the mechanism).

Invariant: the command line is ``dagster dev``'s own, arguments unchanged; only SIGINT and SIGTERM
are restored first.
"""

import sys

from dagster._cli import main as dagster_main

from pipelines.signals import restore_interrupt


def main() -> None:
    restore_interrupt()
    sys.argv = ["dagster", "dev", *sys.argv[1:]]
    dagster_main()


if __name__ == "__main__":
    main()
