"""Several OS processes spend one shared rate budget against a sandbox with a small limit.

The same measurement as ``bench.budget.run_phase`` (which the SQLite test uses), for any budget
backend: the budget's store is named by ``backend`` and ``url`` instead of a SQLite file. The sandbox
runs in its own process and counts, per client IP, the most requests it ever saw inside one rolling
window; that count, not the client's own bookkeeping, is what a test holds to the limit.
"""

import asyncio
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx

# Spawned workers import the client afresh (seconds on a small machine); they report ready and all
# start at one moment, so imports and token fetches do not count against the run.
START_DELAY_S = 1.0
READY_TIMEOUT_S = 120.0
SEARCH_PARAMS = {"_id": "budget-test-no-such-patient"}


def _start_signal(rendezvous: str) -> float:
    folder = Path(rendezvous)
    (folder / f"ready-{os.getpid()}").touch()
    go = folder / "go"
    while not go.exists():
        time.sleep(0.05)
    return float(go.read_text())


async def _spend(
    credentials_path: str,
    backend: str,
    url: str | None,
    budget_path: str,
    limit: int,
    window: float,
    margin: float,
    seconds: float,
    concurrency: int,
    rendezvous: str,
) -> dict[str, int]:
    from resources.redox.client import RedoxClient
    from resources.redox.settings import RateSpec, RedoxSettings

    settings = RedoxSettings.from_credentials(
        credentials_path,
        rate_limit=RateSpec(limit=limit, seconds=window),
        rate_margin=margin,
        budget_backend=backend,
        budget_url=url,
        budget_path=Path(budget_path),
        max_in_flight=concurrency,
        read_timeout=30.0,
    )
    async with RedoxClient(settings, run_id=f"budget-test-{os.getpid()}") as client:
        await client.authorizer("oauth").authorization()  # the token before the clock starts
        start_at = _start_signal(rendezvous)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = start_at + seconds

        async def loop() -> None:
            while time.time() < deadline:
                async for _ in client.fhir.search("Patient", params=SEARCH_PARAMS):
                    pass

        tasks = [asyncio.create_task(loop()) for _ in range(concurrency)]
        await asyncio.wait(tasks, timeout=max(0.0, deadline - time.time()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        frame = client.audit_frame()
    statuses = [row["status"] for row in frame.iter_rows(named=True) if row["surface"] == "fhir"]
    return {
        "ok": sum(1 for s in statuses if s is not None and 200 <= s < 300),
        "received_429": sum(1 for s in statuses if s == 429),
    }


def worker(*args: Any) -> dict[str, int]:
    """Process entry point for one budgeted client (see ``share_one_budget``)."""
    return asyncio.run(_spend(*args))


def share_one_budget(
    *,
    backend: str,
    url: str | None,
    processes: int,
    limit: int,
    window: float,
    windows: float,
    margin: float,
    concurrency: int,
    patients: int = 20,
) -> dict[str, Any]:
    """One sandbox (its own process) limited to ``limit`` per ``window`` s, ``processes`` clients."""
    from sandbox.server import serve_in_subprocess

    seconds = windows * window
    with (
        tempfile.TemporaryDirectory(prefix="redox-budget-test-") as tmp,
        serve_in_subprocess(
            rate_limit=(limit, window), patients=patients, state_dir=Path(tmp) / "sandbox"
        ) as sandbox,
    ):
        rendezvous = Path(tmp) / "rendezvous"
        rendezvous.mkdir()
        args = (
            str(sandbox.credentials_path),
            backend,
            url,
            str(Path(tmp) / "budget.sqlite"),
            limit,
            window,
            margin,
            seconds,
            concurrency,
            str(rendezvous),
        )
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
            futures = [pool.submit(worker, *args) for _ in range(processes)]
            deadline = time.monotonic() + READY_TIMEOUT_S
            while len(list(rendezvous.glob("ready-*"))) < processes:
                if time.monotonic() > deadline or any(f.done() for f in futures):
                    for future in futures:
                        if future.done():
                            future.result()  # a worker that died says why
                    raise TimeoutError("budget test workers did not get ready")
                time.sleep(0.05)
            staged = rendezvous / "go.tmp"
            staged.write_text(str(time.time() + START_DELAY_S))
            staged.replace(rendezvous / "go")  # atomic: a worker never reads a half-written time
            results = [f.result() for f in futures]
        stats = httpx.get(f"{sandbox.base_url}/sandbox/stats", timeout=10).json()
    ok = sum(r["ok"] for r in results)
    return {
        "backend": backend,
        "ok": ok,
        "fraction_of_limit": ok / (limit * seconds / window),
        "received_429": sum(r["received_429"] for r in results),
        "server_429": stats["responses_429"],
        "server_peak_in_window": max(stats["rate_limit"]["peak_in_window"].values(), default=0),
    }
