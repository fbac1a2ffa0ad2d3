"""``python -m bench budget``: how much of Redox's rate limit the shared budget spends, and at what cost.

Several OS processes hit one sandbox (its own process, a small limit so a run takes minutes, not
hours) for a few windows, first through ``RedoxClient`` sharing one SQLite budget, then as a naive
client (plain httpx, retry-on-429 after a fixed pause, no budget) against a fresh sandbox. For each
it reports the achieved rate of accepted requests as a fraction of the limit, the 429s received and
the sandbox's own peak count in any rolling window. Never part of the test suite's pass/fail.

Invariant: both clients run the same request (a FHIR ``Patient`` search by ``_id``, one page), the
same processes, concurrency and duration, so only the rate control differs.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx

# Workers are spawned and import the client afresh (seconds each on a small machine); they report
# ready, then all start at one moment, so imports and token fetches do not count against the run.
START_DELAY_S = 1.0
READY_TIMEOUT_S = 120.0
SEARCH_PARAMS = {"_id": "bench-no-such-patient"}


def _start_signal(rendezvous: str) -> float:
    """Say this worker is ready, then wait (nothing else runs yet) for the parent's common start time."""
    folder = Path(rendezvous)
    (folder / f"ready-{os.getpid()}").touch()
    go = folder / "go"
    while not go.exists():
        time.sleep(0.05)
    return float(go.read_text())


async def _budgeted(
    credentials_path: str,
    backend: str,
    budget_url: str | None,
    budget_path: str,
    limit: int,
    window: float,
    margin: float,
    seconds: float,
    concurrency: int,
    rendezvous: str,
) -> dict[str, Any]:
    from resources.redox.client import RedoxClient
    from resources.redox.settings import RateSpec, RedoxSettings

    settings = RedoxSettings.from_credentials(
        credentials_path,
        rate_limit=RateSpec(limit=limit, seconds=window),
        rate_margin=margin,
        budget_backend=backend,
        budget_url=budget_url,
        budget_path=Path(budget_path),
        max_in_flight=concurrency,
        read_timeout=30.0,
    )
    async with RedoxClient(settings, run_id=f"bench-{os.getpid()}") as client:
        await client.authorizer("oauth").authorization()  # token before the clock starts
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
    stamps = [
        (row["called_at"].timestamp(), row["status"])
        for row in frame.iter_rows(named=True)
        if row["surface"] == "fhir"
    ]
    return _tally(stamps, start_at, deadline)


async def _naive(
    credentials_path: str, seconds: float, concurrency: int, rendezvous: str, backoff: float
) -> dict[str, Any]:
    from resources.redox.auth import ASSERTION_TYPE, client_assertion
    from resources.redox.settings import RedoxSettings

    settings = RedoxSettings.from_credentials(credentials_path)
    stamps: list[tuple[float, int | None]] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as http:
        token = await http.post(
            settings.token_url,
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": client_assertion(
                    client_id=settings.client_id or "", audience=settings.token_url, key=settings.keys[0]
                ),
            },
        )
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        start_at = _start_signal(rendezvous)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = start_at + seconds
        url = f"{settings.fhir_base}/Patient/_search"

        async def loop() -> None:
            while time.time() < deadline:
                sent = time.time()
                response = await http.post(url, data=SEARCH_PARAMS, headers=headers)
                stamps.append((sent, response.status_code))
                if response.status_code == 429:
                    await asyncio.sleep(backoff)

        tasks = [asyncio.create_task(loop()) for _ in range(concurrency)]
        await asyncio.wait(tasks, timeout=max(0.0, deadline - time.time()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return _tally(stamps, start_at, deadline)


def _tally(stamps: list[tuple[float, int | None]], start: float, end: float) -> dict[str, Any]:
    inside = [(t, s) for t, s in stamps if start <= t < end]
    return {
        "ok": sum(1 for _, s in inside if s is not None and 200 <= s < 300),
        "received_429": sum(1 for _, s in stamps if s == 429),
        "attempts": len(stamps),
        "first_request_after_start_s": min((t for t, _ in inside), default=start) - start,
    }


def budgeted_worker(*args: Any) -> dict[str, Any]:
    """Process entry point for one budgeted client (see ``run_phase``)."""
    return asyncio.run(_budgeted(*args))


def naive_worker(*args: Any) -> dict[str, Any]:
    """Process entry point for one naive client (see ``run_phase``)."""
    return asyncio.run(_naive(*args))


def sandbox_stats(base_url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{base_url}/sandbox/stats", timeout=10).json()
    return stats


def run_phase(
    kind: str,
    *,
    processes: int,
    limit: int,
    window: float,
    windows: float,
    margin: float,
    concurrency: int,
    backoff: float,
    patients: int,
    backend: str = "sqlite",
    budget_url: str | None = None,
) -> dict[str, Any]:
    """One sandbox (its own process), ``processes`` clients of ``kind``, ``windows`` windows long.

    Budgeted clients share the budget store ``backend`` names: a SQLite file in the run's temp
    folder, or the Redis / Postgres at ``budget_url``."""
    from sandbox.server import serve_in_subprocess

    seconds = windows * window
    with (
        tempfile.TemporaryDirectory(prefix="redox-bench-") as tmp,
        serve_in_subprocess(
            rate_limit=(limit, window), patients=patients, state_dir=Path(tmp) / "sandbox"
        ) as sb,
    ):
        budget_path = str(Path(tmp) / "budget.sqlite")
        rendezvous = Path(tmp) / "rendezvous"
        rendezvous.mkdir()
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
            if kind == "budgeted":
                args: tuple[Any, ...] = (
                    str(sb.credentials_path),
                    backend,
                    budget_url,
                    budget_path,
                    limit,
                    window,
                    margin,
                    seconds,
                    concurrency,
                    str(rendezvous),
                )
                futures = [pool.submit(budgeted_worker, *args) for _ in range(processes)]
            else:
                args = (str(sb.credentials_path), seconds, concurrency, str(rendezvous), backoff)
                futures = [pool.submit(naive_worker, *args) for _ in range(processes)]
            deadline = time.monotonic() + READY_TIMEOUT_S
            while len(list(rendezvous.glob("ready-*"))) < processes:
                if time.monotonic() > deadline or any(f.done() for f in futures):
                    # A worker died or hangs: its exception (if any) says why.
                    for future in futures:
                        if future.done():
                            future.result()
                    raise TimeoutError("bench workers did not get ready")
                time.sleep(0.05)
            staged = rendezvous / "go.tmp"
            staged.write_text(str(time.time() + START_DELAY_S))
            staged.replace(rendezvous / "go")  # atomic: a worker never reads a half-written time
            results = [f.result() for f in futures]
        stats = sandbox_stats(sb.base_url)
    ok = sum(r["ok"] for r in results)
    return {
        "client": kind,
        "processes": processes,
        "seconds": seconds,
        "ok": ok,
        "fraction_of_limit": ok / (limit * seconds / window),
        "received_429": sum(r["received_429"] for r in results),
        "server_429": stats["responses_429"],
        "server_peak_in_window": max(stats["rate_limit"]["peak_in_window"].values(), default=0),
        "limit": limit,
        "slowest_start_s": max(r["first_request_after_start_s"] for r in results),
    }


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench budget", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--limit", type=int, default=600, help="sandbox limit per window (Redox: 7500)")
    parser.add_argument("--window", type=float, default=30.0, help="window seconds (Redox: 300)")
    parser.add_argument("--windows", type=float, default=3.0, help="run length in windows")
    parser.add_argument(
        "--margin", type=float, default=0.97, help="REDOX_RATE_MARGIN for the budgeted client"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight per process")
    parser.add_argument("--backoff", type=float, default=1.0, help="naive client's pause after a 429")
    parser.add_argument("--repetitions", type=int, default=1)
    parser.add_argument("--patients", type=int, default=50)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--json", action="store_true", help="print raw results as JSON")
    args = parser.parse_args(argv)

    kinds = ["budgeted"] if args.skip_naive else ["budgeted", "naive"]
    rows: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for repetition in range(args.repetitions):
        for kind in kinds:
            result = run_phase(
                kind,
                processes=args.processes,
                limit=args.limit,
                window=args.window,
                windows=args.windows,
                margin=args.margin,
                concurrency=args.concurrency,
                backoff=args.backoff,
                patients=args.patients,
            )
            rows[kind].append(result)
            print(
                f"rep {repetition + 1} {kind:8s}: {result['fraction_of_limit']:.3f} of limit, "
                f"429s received {result['received_429']}, server peak {result['server_peak_in_window']}"
                f"/{args.limit}",
                flush=True,
            )
    if args.json:
        print(json.dumps(rows, indent=2))
    print()
    print(
        f"{args.processes} processes x {args.concurrency} in flight, limit {args.limit}/{args.window:g}s, "
        f"{args.windows:g} windows, {args.repetitions} repetition(s), medians:"
    )
    print("| client | achieved rate / limit | 429s received | server peak in any window |")
    print("|---|---|---|---|")
    for kind in kinds:
        print(
            f"| {kind} | {_median(rows[kind], 'fraction_of_limit'):.3f} | "
            f"{_median(rows[kind], 'received_429'):.0f} | "
            f"{_median(rows[kind], 'server_peak_in_window'):.0f} / {args.limit} |"
        )
    return 0
