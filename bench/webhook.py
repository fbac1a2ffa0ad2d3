"""``python -m bench webhook``: how fast the push lane accepts deliveries, and how soon they are queryable.

The endpoint runs as `redox-etl webhook serve` in its own process (real HTTP on loopback, a fresh
inbox with fsync). The deliveries are real sandbox event messages (``sandbox.push.Pusher.message``
over a sandbox world's write log, Data Model and FHIR mixed), each with its own log id. Three
measurements:

1. ``serial``: one delivery at a time, each after the previous 200, as Redox sends to one
   destination: deliveries per second and latency percentiles;
2. ``paced``: an open loop at ``--rate`` deliveries per second (default 200) for ``--seconds``
   (default 15, the sensor's default interval): accepted per second and p50/p99 latency, measured
   from the scheduled send time (so a server that falls behind shows it);
3. ``lag``: right after the paced phase, one `redox-etl webhook load` (a Dagster run, as the sensor
   requests): arrival-to-queryable per delivery, p50 and max. At the default settings the sensor adds
   up to its interval on top of the run (here the paced phase's length plays that wait).

The baseline, measured first in the same run on the same disk, is the storage floor: SQLite WAL
commits with fsync, one per delivery, with no HTTP around them. The 1-minute load average is printed
because the machine's other work moves every figure.

Never part of the test suite's pass/fail.
"""

import argparse
import asyncio
import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from resources.inbox import Inbox
from sandbox.app import SandboxOptions
from sandbox.push import Pusher, PushOptions
from sandbox.server import build_world

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-4f1c"


def _bodies(n: int) -> list[bytes]:
    world = build_world(SandboxOptions(seed=5, patients=300))
    pusher = Pusher(
        world.store, PushOptions(url="http://unused", token=TOKEN), tz=ZoneInfo("America/New_York")
    )
    versions = world.store.log()
    # Clinical records first, patients after: the mix a subscription mostly sees.
    ordered = [v for v in versions if v.kind != "patients"] + [v for v in versions if v.kind == "patients"]
    return [json.dumps(pusher.message(v).body, separators=(",", ":")).encode() for v in ordered[:n]]


def _fsync_baseline(folder: Path, n: int = 300) -> dict[str, float]:
    """The storage floor on this disk, in this run: one SQLite WAL commit with fsync per delivery."""
    con = sqlite3.connect(folder / "baseline.sqlite", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE t (b BLOB)")
    started = time.perf_counter()
    for _ in range(n):
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO t VALUES (?)", [b"x" * 2000])
        con.execute("COMMIT")
    elapsed = time.perf_counter() - started
    con.close()
    return {"commits_per_second": n / elapsed, "ms_per_commit": elapsed / n * 1000}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _serial(url: str, bodies: list[bytes]) -> dict[str, float]:
    latencies = []
    async with httpx.AsyncClient(timeout=30) as client:
        started = time.perf_counter()
        for body in bodies:
            t = time.perf_counter()
            response = await client.post(
                url, content=body, headers={"verification-token": TOKEN, "content-type": "application/json"}
            )
            latencies.append(time.perf_counter() - t)
            response.raise_for_status()
        elapsed = time.perf_counter() - started
    return {
        "deliveries": len(bodies),
        "per_second": len(bodies) / elapsed,
        "p50_ms": _pct(latencies, 0.5),
        "p99_ms": _pct(latencies, 0.99),
    }


async def _paced(url: str, bodies: list[bytes], rate: float) -> dict[str, float]:
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    # A send waits for a free connection as long as it takes: that wait is part of the latency shown.
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, pool=None), limits=limits) as client:
        start = time.perf_counter() + 0.2

        async def send(i: int, body: bytes) -> None:
            nonlocal failures
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            try:
                response = await client.post(
                    url,
                    content=body,
                    headers={"verification-token": TOKEN, "content-type": "application/json"},
                )
                failures += response.status_code != 200
            except httpx.HTTPError:
                failures += 1
            latencies.append(time.perf_counter() - due)

        await asyncio.gather(*(send(i, b) for i, b in enumerate(bodies)))
        elapsed = time.perf_counter() - start
    return {
        "offered_per_second": rate,
        "deliveries": len(bodies),
        "accepted_per_second": (len(bodies) - failures) / elapsed,
        "failures": failures,
        "p50_ms": _pct(latencies, 0.5),
        "p99_ms": _pct(latencies, 0.99),
        "max_ms": max(latencies) * 1000,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench webhook", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="Paced deliveries per second.")
    parser.add_argument("--seconds", type=float, default=15.0, help="Length of the paced phase.")
    parser.add_argument("--serial", type=int, default=1000, help="Deliveries in the serial phase.")
    parser.add_argument("--port", type=int, default=18787)
    args = parser.parse_args(argv)

    paced_n = int(args.rate * args.seconds)
    print(
        f"load average {os.getloadavg()[0]:.1f}; rendering {args.serial + paced_n} sandbox event messages ...",
        flush=True,
    )
    bodies = _bodies(args.serial + paced_n)
    with tempfile.TemporaryDirectory(prefix="bench-webhook-") as tmp:
        home = Path(tmp)
        baseline = _fsync_baseline(home)
        print(
            "baseline (same disk, same run):",
            json.dumps({k: round(v, 2) for k, v in baseline.items()}),
            flush=True,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDOX_", "DAGSTER_"))}
        env.update(
            {
                "REDOX_ETL_HOME": str(home),
                "DAGSTER_HOME": str(home / "dagster"),
                "REDOX_WEBHOOK_TOKENS": TOKEN,
                "PYTHONPATH": str(ROOT),
            }
        )
        command = [sys.executable, "-m", "pipelines.webhook_cli", "serve", "--port", str(args.port)]
        server = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{args.port}/redox"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(url, timeout=1)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("the webhook endpoint did not start") from None
                    time.sleep(0.1)
            serial = asyncio.run(_serial(url, bodies[: args.serial]))
            print(
                "serial (one at a time, as Redox sends):",
                json.dumps({k: round(v, 2) for k, v in serial.items()}),
                flush=True,
            )
            # The serial phase's deliveries are loaded first, so the lag below is the paced phase's alone.
            subprocess.run(
                [sys.executable, "-m", "pipelines.webhook_cli", "load"],
                env=env,
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            paced = asyncio.run(_paced(url, bodies[args.serial :], args.rate))
            print("paced:", json.dumps({k: round(v, 2) for k, v in paced.items()}), flush=True)
            t = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "pipelines.webhook_cli", "load"],
                env=env,
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            run_seconds = time.perf_counter() - t
        finally:
            server.terminate()
            server.wait(timeout=15)
        summary: dict[str, Any] = (Inbox(home / "inbox" / "inbox.sqlite").status()["last_load"]) or {}
        print(
            "lag (arrival -> queryable, paced deliveries, one load run right after):",
            json.dumps(
                {
                    "deliveries": summary.get("deliveries"),
                    "records": summary.get("records"),
                    "lag_p50_seconds": summary.get("lag_p50_seconds"),
                    "lag_max_seconds": summary.get("lag_max_seconds"),
                    "load_command_seconds": round(run_seconds, 1),
                    "load_average": round(os.getloadavg()[0], 1),
                    "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                }
            ),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
