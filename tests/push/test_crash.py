"""Crash test: the receiver and the loader are SIGKILLed while the sandbox pushes a few thousand events.

Real processes on loopback: the sandbox (in this process) pushes to `redox-etl webhook serve` in a
child process, which is killed

1. during an append (inside the inbox transaction, before its commit),
2. after an append, before the 200 (committed, Redox never heard back, so it sends it again),
3. at an arbitrary moment from outside,

and restarted each time on the same port, while the sandbox's pusher retries with its back-off. A
`redox-etl webhook load` is killed in the middle of a load (after some merges committed, before the
cursor moved), then loads run again to the end. Afterwards the lake must equal the sandbox's truth
for every record the ledger says was pushed: every key once, nothing missing, nothing doubled, and
the inbox holds each acknowledged message exactly once as a first delivery.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from resources.inbox import Inbox
from resources.warehouse import Warehouse
from sandbox.server import serve_in_thread
from tests.push.expect import assert_lake_equals_pushed
from tests.push.harness import ROOT, TOKEN, child_env, free_port, start_receiver_process

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PATIENTS = 400
DAYS = 12

# Wrappers around the real commands that SIGKILL their own process at an exact point.
CRASH_RECEIVER = """
import contextlib, os, signal
from resources import inbox as m
mode, at = os.environ["CRASH_MODE"], int(os.environ["CRASH_AT"])
calls = {"n": 0}
original_tx, original_append = m.Inbox._tx, m.Inbox.append_many
if mode == "during":
    @contextlib.contextmanager
    def _tx(self):
        with original_tx(self) as con:
            yield con
            calls["n"] += 1
            if calls["n"] == at:  # the row is written, the transaction not committed
                os.kill(os.getpid(), signal.SIGKILL)
    m.Inbox._tx = _tx
else:
    def append_many(self, *args, **kwargs):
        out = original_append(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at:  # committed, the 200 not sent
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    m.Inbox.append_many = append_many
from pipelines.webhook_cli import app
app()
"""

CRASH_LOADER = """
import os, signal
from resources.warehouse import Warehouse
original = Warehouse.merge
calls = {"n": 0}
def merge(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    calls["n"] += 1
    if calls["n"] == 3:  # three merges committed, the cursor not moved
        os.kill(os.getpid(), signal.SIGKILL)
    return out
Warehouse.merge = merge
from pipelines.webhook_cli import app
app(["load"])
"""


def _load(env: dict[str, str], *, crash: bool = False) -> int:
    command = (
        [sys.executable, "-c", CRASH_LOADER]
        if crash
        else [sys.executable, "-m", "pipelines.webhook_cli", "load"]
    )
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=600)
    if done.returncode not in (0, -signal.SIGKILL):
        print(done.stdout.decode()[-3000:], done.stderr.decode()[-3000:])
    return done.returncode


def _push_status(base_url: str) -> dict[str, Any]:
    return httpx.get(f"{base_url}/sandbox/push", timeout=30).json()


def test_killed_receiver_and_loader_converge_to_truth_exactly_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = child_env(home, DAGSTER_HOME=str(tmp_path / "dagster"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/redox"
    crashes = [("during", "150"), ("after", "300"), ("outside", "")]
    processes: list[subprocess.Popen[bytes]] = []
    kills = {"during": 0, "after": 0, "outside": 0}

    def start(mode: str, at: str) -> subprocess.Popen[bytes]:
        if mode in ("during", "after"):
            process = start_receiver_process(
                port, {**env, "CRASH_MODE": mode, "CRASH_AT": at}, script=CRASH_RECEIVER
            )
        else:
            process = start_receiver_process(port, env)
        processes.append(process)
        return process

    receiver = start(*crashes[0])
    current = crashes.pop(0)
    loader_killed = False
    try:
        with serve_in_thread(
            patients=PATIENTS,
            seed=11,
            rate_limit=None,
            push_to=url,
            push_token=TOKEN,
            push_retry=(0.05, 0.5),
            push_redeliver=0.02,
        ) as sandbox:
            httpx.post(
                f"{sandbox.base_url}/sandbox/advance", json={"days": DAYS}, timeout=120
            ).raise_for_status()
            outside_at = None
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline:
                status = _push_status(sandbox.base_url)
                if receiver.poll() is not None:
                    assert receiver.returncode == -signal.SIGKILL
                    kills[current[0]] += 1
                    current = crashes.pop(0) if crashes else ("none", "")
                    receiver = start(*current)
                    if current[0] == "outside":
                        outside_at = status["delivered"] + 200
                if current[0] == "outside" and outside_at is not None and status["delivered"] >= outside_at:
                    receiver.send_signal(signal.SIGKILL)
                    receiver.wait()
                    outside_at = None
                    continue
                if not loader_killed and status["delivered"] > 800:
                    # A load killed mid-way while deliveries keep arriving.
                    assert _load(env, crash=True) == -signal.SIGKILL
                    loader_killed = True
                if status["cursor_seq"] >= status["head_seq"] and status["verified"]:
                    break
                time.sleep(0.2)
            status = _push_status(sandbox.base_url)
            truth = sandbox.world.truth()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert status["cursor_seq"] == status["head_seq"], "the pusher did not finish in time"
    assert kills == {"during": 1, "after": 1, "outside": 1}
    assert loader_killed
    ledger = status["ledger"]
    assert len(ledger) > 2000

    # Every acknowledged message is in the inbox once as a first delivery; the one whose 200 was
    # lost came twice and is marked a redelivery.
    inbox = Inbox(home / "inbox" / "inbox.sqlite")
    stored = inbox.deliveries()
    firsts = [d.key for d in stored if d.duplicate_of is None]
    assert len(firsts) == len(set(firsts))
    acknowledged = {
        f"log:{e['log_id']}" if e["surface"] == "datamodel" else f"fhir-message:{e['log_id']}" for e in ledger
    }
    assert set(firsts) == acknowledged
    redelivered = sum(1 for e in ledger if e["redelivery"])
    assert sum(1 for d in stored if d.duplicate_of is not None) >= redelivered + 1

    # The loader resumes from its cursor; a second load finds nothing new.
    assert _load(env) == 0
    assert _load(env) == 0
    assert inbox.loaded_seq() == inbox.head_seq()
    assert_lake_equals_pushed(Warehouse(lake_dir=str(home / "lake")), truth, ledger, only_pushed=True)
