"""A command started with SIGINT ignored (cron, nohup) must not end up ignoring SIGTERM, which
Dagster derives from SIGINT and every process a run starts inherits."""

import signal
import subprocess
import sys

import pytest

# What a Dagster block that captured interrupts leaves behind in the main thread, then what a
# process started afterwards (a compute-log tail) would inherit for SIGTERM.
AFTER_DAGSTER = """
import signal
{setup}
from dagster._utils.interrupts import capture_interrupts
with capture_interrupts():
    pass
print("ignored" if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN else "handled")
"""


def _ignore(*signals: signal.Signals) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def _run(setup: str, ignored: tuple[signal.Signals, ...] = (signal.SIGINT,)) -> str:
    done = subprocess.run(
        [sys.executable, "-c", AFTER_DAGSTER.format(setup=setup)],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: _ignore(*ignored),
    )
    return done.stdout.strip()


def test_without_the_restore_sigterm_ends_up_ignored() -> None:
    # The failure this module exists for, reproduced: the check below can tell the difference.
    assert _run("") == "ignored"


@pytest.mark.parametrize(
    "setup",
    [
        "from pipelines.signals import restore_interrupt; restore_interrupt()",
        # The CLI's own entry (every `redox-etl` command) restores it before any Dagster code runs.
        "import typer; from pipelines.cli import _main; _main(typer.Context(typer.main.get_command(__import__('pipelines.cli').cli.app)))",
        # `make ui`'s `dagster dev` (replaced here by a no-op: the restore must come before it).
        "import pipelines.ui as ui; ui.dagster_main = lambda: None; ui.main()",
    ],
    ids=["restore_interrupt", "redox-etl callback", "make ui"],
)
def test_after_the_restore_sigterm_stays_handled(setup: str) -> None:
    assert _run(setup) == "handled"


def test_a_command_started_with_sigterm_ignored_gets_it_back() -> None:
    # A run outside the main thread never replaces SIGTERM: what the command inherited is what its
    # log tails inherit.
    code = "from pipelines.signals import restore_interrupt; restore_interrupt()"
    both = (signal.SIGINT, signal.SIGTERM)
    assert _run("", both) == "ignored"
    assert _run(code, both) == "handled"
