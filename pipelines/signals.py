"""Signal dispositions a command must not inherit from whoever started it.

cron, ``nohup ... &`` and non-interactive shells start background commands with SIGINT ignored.
Dagster maps SIGTERM to whatever handles SIGINT each time it restores its interrupt handlers
(``dagster._utils.interrupts``), so in such a process SIGTERM becomes ignored after the first
Dagster block that captured interrupts, and every process started after that inherits it: the
``tail`` processes that capture a step's logs then survive Dagster's ``terminate()``, hold the
command's output open after it exits, and a reader of that output waits forever.

A command can also inherit SIGTERM itself ignored from whatever started it; a run that executes
outside the main thread never replaces it, so the tails inherit that the same way.

Invariant: once ``restore_interrupt`` has run in a process's main thread, SIGINT has Python's own
handler and SIGTERM is not ignored, so nothing Dagster derives from them can leave SIGTERM ignored.
"""

import signal


def restore_interrupt() -> None:
    """Give SIGINT Python's default handler back, and SIGTERM its default action, where the process
    was started with either ignored."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
