"""`python -m bench sandbox`: how fast the sandbox starts and how many FHIR search pages it serves.

The server runs in its own process (``serve_in_subprocess``), rate limiting off, so it has a GIL to
itself; several client processes walk day-window searches (Encounter, Observation, Appointment,
``_count`` pages, following every next link) over HTTP/1.1 keep-alive for a fixed time. Clients use
http.client and read the next link with a regex instead of parsing the page, so they stay cheaper
than the server they measure. Each figure is the median of ``--repeat`` runs.

Target (issue 2): at 10,000 patients, startup < 10 s and >= 500 pages/s on loopback.

With latency (issue 14): a sandbox whose every FHIR answer waits a fixed ``--latency-seconds``
receives ``--waiting`` requests from one asyncio client, ``--concurrency`` at a time; the figure is
requests answered per second and the server's own peak of answers waiting at once (target: >= 50
requests/s while every answer waits). And the hospital profile's startup for ``--hospital-days``
(target < 60 s).
"""

import argparse
import asyncio
import http.client
import multiprocessing
import os
import re
import statistics
import sys
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

NEXT = re.compile(rb'"relation":"next","url":"([^"]+)"')
RESOURCES = ("Encounter", "Observation", "Appointment")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def _token(credentials: dict[str, Any]) -> str:
    from cryptography.hazmat.primitives import serialization

    from sandbox import auth

    private = serialization.load_pem_private_key(credentials["private_key_pem"].encode(), None)
    key = auth.KeyPair(credentials["kid"], credentials["algorithm"], private)  # type: ignore[arg-type]
    assertion = auth.make_assertion(credentials["client_id"], key, credentials["token_url"])
    response = httpx.post(
        credentials["token_url"],
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": auth.ASSERTION_TYPE,
            "client_assertion": assertion,
        },
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


def _client(args: tuple[str, str, list[str], int, float, int]) -> tuple[int, int]:
    """One client process: walk day windows until the deadline; return (pages, bytes).

    http.client, not httpx: httpx's per-request work (URL validation, h11) costs more CPU than the
    server spends on a page, and on a small machine the clients share cores with the server.
    """
    fhir_base, token, days, count, seconds, offset = args
    base = urllib.parse.urlsplit(fhir_base)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-www-form-urlencoded"}
    connection = http.client.HTTPConnection(base.hostname or "127.0.0.1", base.port, timeout=60)
    pages = size = 0
    deadline = time.monotonic() + seconds
    windows = [(r, d) for d in days for r in RESOURCES]
    i = offset
    while time.monotonic() < deadline:
        resource, day = windows[i % len(windows)]
        i += 1
        day_after = (datetime.fromisoformat(day) + timedelta(days=1)).date().isoformat()
        form = urllib.parse.urlencode({"date": [f"ge{day}", f"lt{day_after}"], "_count": count}, doseq=True)
        connection.request("POST", f"{base.path}/{resource}/_search", body=form, headers=headers)
        while True:
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"{resource} search answered {response.status}")
            pages += 1
            size += len(body)
            match = NEXT.search(body, 0, 4096)
            if not match or time.monotonic() >= deadline:
                break
            link = urllib.parse.urlsplit(match.group(1).decode())
            connection.request("GET", f"{link.path}?{link.query}", headers=headers)
    connection.close()
    return pages, size


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far. Unlike wall time it hardly moves with
    the machine's load, so it says whether startup itself got cheaper."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _days(credentials: dict[str, Any], n: int) -> list[str]:
    """Days with data: the most recent ``n`` days before the sandbox clock."""
    stats = httpx.get(f"{credentials['base_url']}/sandbox/stats").json()
    clock = datetime.fromisoformat(stats["clock"]).astimezone(UTC)
    return [(clock - timedelta(days=k)).date().isoformat() for k in range(1, n + 1)]


def _waiting(latency: float, requests: int, concurrency: int) -> tuple[float, int, float]:
    """(requests answered per second, the server's peak of answers waiting at once, wall seconds)."""
    from sandbox.server import serve_in_subprocess

    with serve_in_subprocess(
        patients=200, rate_limit=None, token_ttl=3600, latency=f"fhir={latency:g}s"
    ) as running:
        token = _token(running.credentials)
        url = f"{running.credentials['fhir_base']}/Patient/no-such-patient"
        headers = {"Authorization": f"Bearer {token}"}

        async def burst() -> float:
            # Raw HTTP/1.1 over asyncio streams, one keep-alive connection per slot: an httpx client
            # costs more CPU per request than the server spends, and would measure itself.
            parts = urllib.parse.urlsplit(url)
            request = (
                f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Authorization: {headers['Authorization']}\r\n\r\n"
            ).encode()
            left = [requests]

            async def connection() -> None:
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                try:
                    while left[0] > 0:
                        left[0] -= 1
                        writer.write(request)
                        head = await reader.readuntil(b"\r\n\r\n")
                        # A read of an unknown id: answered (404) after the same wait as any other.
                        if not head.startswith(b"HTTP/1.1 404"):
                            raise RuntimeError(f"unexpected answer {head[:20]!r}")
                        length = re.search(rb"(?i)content-length: *(\d+)", head)
                        await reader.readexactly(int(length.group(1)) if length else 0)
                finally:
                    writer.close()

            began = time.perf_counter()
            await asyncio.gather(*(connection() for _ in range(concurrency)))
            return time.perf_counter() - began

        wall = asyncio.run(burst())
        peak = httpx.get(f"{running.base_url}/sandbox/stats").json()["latency"]["peak_waiting"]
    return requests / wall, int(peak), wall


def _hospital_startup(days: int) -> tuple[float, float]:
    """(wall seconds, server CPU seconds) from spawn to listening, hospital profile, ``days`` days."""
    from sandbox.server import serve_in_subprocess

    end = datetime.now(UTC).date() - timedelta(days=1)
    began = time.perf_counter()
    with serve_in_subprocess(
        profile="hospital",
        start=end - timedelta(days=days - 1),
        end=end,
        rate_limit=None,
        startup_timeout=900,
    ) as running:
        wall = time.perf_counter() - began
        assert running.process is not None
        return wall, _cpu_seconds(running.process.pid)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench sandbox", description=__doc__)
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of one throughput run")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--count", type=int, default=50, help="_count per page")
    parser.add_argument("--days", type=int, default=30, help="distinct day windows the clients cycle through")
    parser.add_argument("--latency-seconds", type=float, default=1.0, help="fixed latency of every answer")
    parser.add_argument("--waiting", type=int, default=1200, help="requests sent against that latency")
    parser.add_argument("--concurrency", type=int, default=150, help="requests in flight at once")
    parser.add_argument("--hospital-days", type=int, default=12, help="days of the hospital world (0: skip)")
    parser.add_argument("--write", action="store_true", help="write the figures into docs/benchmarks.md")
    args = parser.parse_args(argv)

    from sandbox.server import serve_in_subprocess

    command = "uv run --frozen python -m bench sandbox " + " ".join(argv)
    print(f"# {command}".rstrip())
    startups: list[float] = []
    cpus: list[float] = []
    throughputs: list[float] = []
    sizes: list[float] = []
    # Other work on the machine moves these figures a lot; the 1-minute load average is recorded.
    loads: list[float] = []
    context = multiprocessing.get_context("spawn")
    for run in range(args.repeat):
        began = time.perf_counter()
        load = os.getloadavg()[0]
        with serve_in_subprocess(
            patients=args.patients, rate_limit=None, token_ttl=3600, startup_timeout=600
        ) as running:
            startup = time.perf_counter() - began
            startups.append(startup)
            assert running.process is not None
            cpus.append(_cpu_seconds(running.process.pid))
            credentials = running.credentials
            token = _token(credentials)
            days = _days(credentials, args.days)
            jobs = [
                (credentials["fhir_base"], token, days, args.count, args.seconds, k * 7)
                for k in range(args.clients)
            ]
            with context.Pool(args.clients) as pool:
                # Warm-up: one short pass so imports and first-render costs are not measured.
                pool.map(_client, [(*job[:4], 1.0, job[5]) for job in jobs])
                began = time.perf_counter()
                results = pool.map(_client, jobs)
                elapsed = time.perf_counter() - began
            pages = sum(p for p, _ in results)
            throughputs.append(pages / elapsed)
            sizes.append(sum(s for _, s in results) / max(pages, 1) / 1024)
            loads.append(max(load, os.getloadavg()[0]))
            print(
                f"run {run + 1}: startup {startup:.2f} s ({cpus[-1]:.2f} s CPU), {pages} pages in {elapsed:.1f} s = "
                f"{pages / elapsed:.0f} pages/s ({sizes[-1]:.0f} KiB/page, load average {loads[-1]:.1f})"
            )
    startup_median = statistics.median(startups)
    pages_median = statistics.median(throughputs)
    print(f"startup median {startup_median:.2f} s, {statistics.median(cpus):.2f} s CPU (target < 10 s)")
    print(f"throughput median {pages_median:.0f} pages/s (target >= 500)")
    rate, peak, wall = _waiting(args.latency_seconds, args.waiting, args.concurrency)
    print(
        f"with {args.latency_seconds:g} s latency on every answer: {args.waiting} requests in {wall:.1f} s = "
        f"{rate:.0f} requests/s, peak {peak} answers waiting at once (target >= 50 requests/s)"
    )
    hospital = _hospital_startup(args.hospital_days) if args.hospital_days > 0 else None
    if hospital is not None:
        print(
            f"hospital profile, {args.hospital_days} days: startup {hospital[0]:.1f} s "
            f"({hospital[1]:.1f} s CPU) (target < 60 s)"
        )
    if args.write:
        _write_docs(
            command,
            args,
            startup_median,
            pages_median,
            statistics.median(sizes),
            startups,
            throughputs,
            loads,
            cpus,
            (rate, peak, wall),
            hospital,
        )
    return 0


def _write_docs(
    command: str,
    args: argparse.Namespace,
    startup: float,
    pages: float,
    kib: float,
    startups: list[float],
    throughputs: list[float],
    loads: list[float],
    cpus: list[float],
    waiting: tuple[float, int, float],
    hospital: tuple[float, float] | None,
) -> None:
    rate, peak, wall = waiting
    hospital_row = (
        [
            f"| startup, hospital profile ({args.hospital_days} days, 75,000 persons; server CPU "
            f"{hospital[1]:.1f} s) | {hospital[0]:.1f} s | 1 | < 60 s |"
        ]
        if hospital
        else []
    )
    section = "\n".join(
        [
            "## Sandbox",
            "",
            f"Measured {datetime.now(UTC).date().isoformat()} on this machine "
            f"({multiprocessing.cpu_count()} CPUs, Python {sys.version.split()[0]}; 1-minute load average "
            f"during the runs {', '.join(f'{x:.1f}' for x in loads)}, from other work on the machine):",
            "",
            "```",
            command,
            "```",
            "",
            "| figure | median | runs | target |",
            "|---|---|---|---|",
            f"| startup at {args.patients:,} patients (spawn to credentials.json) | {startup:.2f} s | "
            + ", ".join(f"{s:.2f}" for s in startups)
            + " | < 10 s |",
            f"| server CPU time at startup (user + system, same runs) | {statistics.median(cpus):.2f} s | "
            + ", ".join(f"{c:.2f}" for c in cpus)
            + " | |",
            f"| FHIR search pages/s ({args.clients} client processes, _count={args.count}, "
            f"~{kib:.0f} KiB/page, rate limit off) | {pages:.0f} | "
            + ", ".join(f"{t:.0f}" for t in throughputs)
            + " | >= 500 |",
            f"| requests/s while every answer waits {args.latency_seconds:g} s ({args.waiting} FHIR reads, "
            f"{args.concurrency} in flight; peak {peak} waiting at once, {wall:.1f} s) | {rate:.0f} | 1 | >= 50 |",
            *hospital_row,
            "",
            "The server runs in its own process; clients walk Encounter/Observation/Appointment day-window",
            "searches over keep-alive connections and follow every next link (see bench/sandbox.py).",
            "Startup ends when credentials.json is written, with the server listening and the world built;",
            "the store's query indexes are then built in a background thread (a search that arrives first",
            "waits for them). Wall time grows with the machine's load (2 CPUs shared with other work),",
            "CPU time much less, so both are shown.",
            "",
            "Latency rows (issue 14): a sandbox whose every FHIR answer waits a fixed 1 s, one asyncio client",
            "with raw keep-alive HTTP/1.1 connections (an httpx client on this loaded machine measured itself at",
            "~35 requests/s); 150 in flight give ~150 requests/s, every answer waiting at once, so the waits",
            "hold no thread. The hospital row is the startup of `--profile hospital` for 12 days (~510,000",
            "results on the two surfaces).",
            "",
        ]
    )
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\n"
    match = re.search(r"^## Sandbox\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    if match:
        text = text[: match.start()] + section + "\n" + text[match.end() :].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS.write_text(text.rstrip("\n") + "\n")
    print(f"wrote the Sandbox section of {DOCS}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
