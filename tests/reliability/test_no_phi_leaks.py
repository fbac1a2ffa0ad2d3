"""No leaks: after a real sync, no patient value and no private key outside the lake.

A sandbox serves three clinical days of a population, with malformed records and duplicated pages
switched on (errors and quarantine are where values usually escape). Every asset is materialized on a
persistent Dagster instance (DAGSTER_HOME in a temp folder, as ``redox-etl sync`` has it), then a run
is made to fail (every request answered 5xx) so that exception text and failure events exist too.
Everything the runs left behind is then scanned for the sandbox's own values (from its ground truth):

- every Dagster event of every run (``instance.all_logs``), the runs themselves (tags, config),
  asset materialization and check metadata, and the exception text of failed steps;
- every log record emitted in the process (a root handler at DEBUG, traceback included) and
  everything written to the process's stdout and stderr file descriptors;
- the lake's audit and bookkeeping tables (api_calls, sync_state, partition_loads, ...);
- every file under the temp root (DAGSTER_HOME with its SQLite event storage and compute logs,
  REDOX_ETL_HOME with the rate budget and the lake's catalog) EXCEPT the lake's data files
  (``lake/data``: the Parquet tables, and ``lake/raw``: the landed pages), which hold patient data
  by design, and ``credentials.json``, which is the secret file itself (its mode must be 0600). The
  lake's catalog is scanned on its own: DuckLake's column statistics put patient values there, so it
  is held to the data's standard (owner-only) instead. The push lane's inbox (``inbox/``) holds
  delivery bodies by design: it is left out like the lake's data and must be owner-only too.

The push lane runs in the same session: the webhook receiver (real HTTP, in this process so its
logs are captured) takes a sandbox pusher's deliveries and refuses deliveries whose bodies carry
patient values (wrong token, not JSON, too large); ``pushed_deliveries`` loads the inbox; the
output of ``webhook status`` is scanned with the rest.

Values looked for: given, middle and family names (only those of 4 characters or more, matched as
whole words and case-sensitively: shorter ones such as "Li" or "Ng" are everyday substrings), birth
dates (ISO 8601; those inside the synced window's days are skipped, since partition keys and
timestamps legitimately hold them), SSNs, MRNs and every other identifier value (matched with no
digit or letter on either side), and each line of the sandbox keys' PEM bodies, plus any PEM
private-key header. A failure names the kind of value and where it was found, never the value.
"""

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import stat
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import httpx
import polars as pl
import pytest
from dagster._serdes import serialize_value
from filelock import FileLock

from assets import all_assets
from resources import all_resources
from resources.inbox import Inbox
from resources.warehouse import Warehouse
from sandbox.faults import FaultSpec
from sandbox.push import Pusher, PushOptions
from schema import WAREHOUSE_TABLES
from tests.push.harness import TOKEN, receiver_in_thread
from tests.reliability.sync_harness import SyncEnv, materialize, sync_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PATIENTS = 80
FAULTS = "malformed=0.3,dup=0.05"
DAYS = 3
MIN_NAME = 4
# Patient data by design; everything else under the root is scanned.
LAKE_DATA = ("data", "raw")
INBOX = "inbox"


def _words(values: Iterable[str | None]) -> set[str]:
    return {v for v in values if v and len(v) >= MIN_NAME}


class Needles:
    """The sandbox's own values, by kind, as byte regexes that never show the value."""

    def __init__(
        self, truth: dict[str, pl.DataFrame], credentials: dict[str, object], skip_days: set[dt.date]
    ):
        patients = truth["patients"]
        identifiers = patients.select(pl.col("identifiers").explode().struct.field("value")).to_series()
        mrns = patients.filter(pl.col("source_surface") == "datamodel")["source_id"]
        births = {d for d in patients["birth_date"].drop_nulls().to_list() if d not in skip_days}
        self.skipped_births = patients["birth_date"].drop_nulls().n_unique() - len(births)
        pem_lines = set()
        for name in ("private_key_pem", "second_private_key_pem"):
            pem = credentials.get(name)
            if isinstance(pem, str):
                pem_lines |= {line for line in pem.splitlines() if line and not line.startswith("-----")}
        words = r"(?<![A-Za-z])(?:{})(?![A-Za-z])"
        ids = r"(?<![A-Za-z0-9])(?:{})(?![A-Za-z0-9])"
        self.kinds: dict[str, re.Pattern[bytes]] = {}
        self.samples: dict[str, str] = {}
        for kind, values, frame in (
            ("given name", _words(patients["given_name"]), words),
            ("middle name", _words(patients["middle_name"]), words),
            ("family name", _words(patients["family_name"]), words),
            ("birth date", {d.isoformat() for d in births}, ids),
            ("SSN", set(patients["ssn"].drop_nulls()), ids),
            ("MRN or identifier", set(identifiers.drop_nulls()) | set(mrns.drop_nulls()), ids),
            ("private key", pem_lines, "(?:{})"),
        ):
            assert values, f"the sandbox's truth has no {kind} values: the scan would prove nothing"
            self.samples[kind] = min(values)
            alternation = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
            self.kinds[kind] = re.compile(frame.format(alternation).encode())
        self.kinds["private key header"] = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")

    def find(self, data: bytes) -> Counter[str]:
        return Counter({kind: n for kind, rx in self.kinds.items() if (n := len(rx.findall(data)))})


class Findings:
    def __init__(self, needles: Needles) -> None:
        self.needles = needles
        self.hits: list[str] = []
        self.scanned: Counter[str] = Counter()

    def scan(self, where: str, data: bytes | str, *, counted_as: str) -> None:
        raw = data.encode("utf-8", "replace") if isinstance(data, str) else data
        self.scanned[counted_as] += 1
        for kind, n in self.needles.find(raw).items():
            self.hits.append(f"{kind} x{n} in {where}")


def _scan_files(env: SyncEnv, outside: Findings, catalog: Findings) -> None:
    lake_data = [env.lake / name for name in LAKE_DATA] + [env.home / INBOX]
    for path in sorted(env.root.rglob("*")):
        if not path.is_file() or any(path.is_relative_to(d) for d in lake_data):
            continue
        if path == env.running.credentials_path:
            continue
        where = f"file {path.relative_to(env.root)}"
        if path.parent == env.lake and path.name.startswith("catalog.sqlite"):
            catalog.scan(where, path.read_bytes(), counted_as="catalog")
        else:
            outside.scan(where, path.read_bytes(), counted_as="files")


def _scan_runs(env: SyncEnv, findings: Findings) -> None:
    instance = env.instance
    for run in instance.get_runs():
        findings.scan(f"run {run.run_id[:8]} tags/config", serialize_value(run), counted_as="runs")
        for record in instance.all_logs(run.run_id):
            kind = record.dagster_event.event_type_value if record.dagster_event else "log message"
            findings.scan(f"event {kind}", serialize_value(record), counted_as="events")
            if record.dagster_event and record.dagster_event.is_step_failure:
                error = record.dagster_event.step_failure_data.error
                findings.scan("step failure exception text", str(error), counted_as="exceptions")


def _scan_results(results: list[dg.ExecuteInProcessResult], findings: Findings) -> None:
    for result in results:
        for materialization in result.get_asset_materialization_events():
            data = materialization.step_materialization_data.materialization
            findings.scan(
                f"materialization metadata of {data.asset_key.to_user_string()}",
                serialize_value(data.metadata),
                counted_as="materializations",
            )
        for check in result.get_asset_check_evaluations():
            findings.scan(
                f"check metadata of {check.check_name}", serialize_value(check.metadata), counted_as="checks"
            )


def _scan_bookkeeping(findings: Findings) -> None:
    """The lake's audit and bookkeeping tables are shown as run metadata and in docs: unlike the
    clinical tables, quarantine and identity outputs, they must hold no patient value."""
    warehouse = Warehouse()
    present = set(
        warehouse.query("SELECT table_name FROM duckdb_tables() WHERE database_name = 'lake'")["table_name"]
    )
    for table in sorted({"api_calls", "sync_state", *WAREHOUSE_TABLES} & present):
        rows = warehouse.query(f"SELECT * FROM {table}")
        findings.scan(f"lake table {table}", rows.write_csv(), counted_as="bookkeeping tables")


def _window_days(env: SyncEnv) -> set[dt.date]:
    # Partition keys, timestamps of the run and the sandbox's clock: dates a run may name freely.
    start = env.first - dt.timedelta(days=2)
    end = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    return {start + dt.timedelta(days=i) for i in range((end - start).days + 1)}


@contextlib.contextmanager
def _captured_fds(folder: Path) -> Iterator[dict[int, Path]]:
    """Everything written to this process's stdout and stderr, by Python or by native code."""
    folder.mkdir(parents=True)
    files = {fd: folder / f"fd{fd}" for fd in (1, 2)}
    saved: dict[int, int] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in files.items():
        saved[fd] = os.dup(fd)
        with path.open("wb") as handle:
            os.dup2(handle.fileno(), fd)
    try:
        yield files
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # format() appends the traceback of exc_info: exception text is scanned with the message.
        self.lines.append(self.format(record))


@contextlib.contextmanager
def _captured_logs() -> Iterator[_Keep]:
    root = logging.getLogger()
    keep, level = _Keep(), root.level
    root.addHandler(keep)
    root.setLevel(logging.DEBUG)
    try:
        yield keep
    finally:
        root.removeHandler(keep)
        root.setLevel(level)


@dataclasses.dataclass
class Scan:
    """What the scan found: places and kinds only, never a value (it is shared between workers)."""

    outside: list[str]
    catalog: list[str]
    scanned: dict[str, int]
    # Kinds whose needles found their own sample in a log-shaped line (the scan can see a leak).
    kinds_checked: list[str]
    kinds: list[str]
    credentials_mode: int
    # Catalog file name -> its permission bits.
    catalog_modes: dict[str, int]
    skipped_births: int
    # Inbox file (and its folder, as "/") -> permission bits; deliveries the pusher got acknowledged.
    inbox_modes: dict[str, int]
    pushed: int


def _run_scan(root: Path) -> Scan:
    """One sync and one failed run, then every trace they left, scanned."""
    with (
        pytest.MonkeyPatch.context() as monkeypatch,
        _captured_fds(root / "captured") as fds,
        _captured_logs() as logs,
        sync_env(root / "run", monkeypatch, patients=PATIENTS, days=DAYS, faults=FAULTS) as env,
    ):
        synced = materialize(env)
        assert synced.success
        quarantined = sum(
            int(m.step_materialization_data.materialization.metadata["quarantined"].value)  # type: ignore[arg-type]
            for m in synced.get_asset_materialization_events()
            if "quarantined" in m.step_materialization_data.materialization.metadata
        )
        assert quarantined > 0, "no record was quarantined: the error path this test is for did not run"

        pushed, push_result, status_text = _push_lane(env)

        # A run that fails: every clinical request answered 5xx, two attempts, so the steps raise.
        assert env.running.sandbox is not None
        env.running.sandbox.faults.spec = FaultSpec.parse("5xx=1")
        monkeypatch.setenv("REDOX_RETRY_ATTEMPTS", "2")
        monkeypatch.setenv("REDOX_RETRY_TIMEOUT", "5")
        failed = materialize(
            env, selection=["fhir_encounters", "dm_results"], first=env.last, raise_on_error=False
        )
        assert not failed.success

        needles = Needles(env.running.world.truth(), dict(env.running.credentials), _window_days(env))
        outside, catalog = Findings(needles), Findings(needles)
        _scan_runs(env, outside)
        _scan_results([synced, failed, push_result], outside)
        outside.scan("webhook status", status_text, counted_as="webhook status")
        _scan_bookkeeping(outside)
    _scan_files(env, outside, catalog)
    assert len(logs.lines) > 100, "the log capture saw almost nothing"
    outside.scan("log records", "\n".join(logs.lines), counted_as="log records")
    for fd, path in fds.items():
        outside.scan(
            f"{'stdout' if fd == 1 else 'stderr'} of the process", path.read_bytes(), counted_as="output"
        )
    checked = [
        kind
        for kind, sample in needles.samples.items()
        if needles.find(f"2026-11-21 INFO loaded '{sample}' for step x".encode())[kind] == 1
    ]
    return Scan(
        outside=sorted(set(outside.hits)),
        catalog=sorted(set(catalog.hits)),
        scanned=dict(outside.scanned + catalog.scanned),
        kinds_checked=checked,
        kinds=list(needles.samples),
        credentials_mode=stat.S_IMODE(env.running.credentials_path.stat().st_mode),
        catalog_modes={
            p.name: stat.S_IMODE(p.stat().st_mode) for p in env.lake.glob("catalog.sqlite*") if p.is_file()
        },
        skipped_births=needles.skipped_births,
        inbox_modes={
            **{p.name: stat.S_IMODE(p.stat().st_mode) for p in (env.home / INBOX).iterdir() if p.is_file()},
            "/": stat.S_IMODE((env.home / INBOX).stat().st_mode),
        },
        pushed=pushed,
    )


def _push_lane(env: SyncEnv) -> tuple[int, dg.ExecuteInProcessResult, str]:
    """Half a day of changes pushed to the receiver, refusals that carry patient values, one load."""
    store = env.running.world.store
    with receiver_in_thread(env.home / INBOX / "inbox.sqlite", max_body=50_000) as url:
        options = PushOptions(url=url, token=TOKEN, retry_first=0.05, retry_cap=0.5, redeliver=0.1)
        pusher = Pusher(store, options, tz=ZoneInfo("America/New_York")).start()
        env.running.world.advance(dt.timedelta(hours=12))
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120)
        while pusher.cursor < store.head_seq and dt.datetime.now(dt.UTC) < deadline:
            time.sleep(0.05)
        pusher.stop()
        # A body full of patient values, refused three ways: none of it may be kept or echoed.
        version = next(v for v in reversed(store.log()) if v.kind == "patients")
        body = json.dumps(pusher.message(version).body).encode()
        headers = {"verification-token": TOKEN}
        assert httpx.post(url, content=body, headers={"verification-token": "wrong"}).status_code == 403
        assert httpx.post(url, content=b"<" + body, headers=headers).status_code == 400
        assert httpx.post(url, content=body * 100, headers=headers).status_code == 413
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = dg.materialize(
            all_assets, selection=["pushed_deliveries"], resources=all_resources(), instance=env.instance
        )
    assert result.success
    status = json.dumps(Inbox(env.home / INBOX / "inbox.sqlite").status(), default=str)
    return len(pusher.ledger()), result, status


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Scan:
    """The scan, made once per test session. pytest-xdist may place this module's tests on
    different workers (its xdist_group marks do not take effect with the pytest in the lock), so
    workers share one result through a file in the session's base temp folder, under a lock."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return _run_scan(tmp_path_factory.mktemp("phi"))
    shared = tmp_path_factory.getbasetemp().parent / "phi-leaks-scan.json"
    with FileLock(f"{shared}.lock"):
        if shared.exists():
            return Scan(**json.loads(shared.read_text()))
        result = _run_scan(tmp_path_factory.mktemp("phi"))
        shared.write_text(json.dumps(dataclasses.asdict(result)))
        return result


def test_the_scan_would_see_a_leak(scan: Scan) -> None:
    """Each kind of needle finds its own values in text shaped like a log line, and the scan had
    something to look at, or a clean result would prove nothing."""
    assert scan.kinds_checked == scan.kinds
    assert scan.scanned["events"] > 100 and scan.scanned["files"] > 5, scan.scanned
    assert scan.scanned["exceptions"] >= 1, "the failed run left no step failure to scan"
    assert scan.scanned["log records"] == 1 and scan.scanned["catalog"] >= 1, scan.scanned
    assert scan.scanned["bookkeeping tables"] >= 3, scan.scanned


def test_no_patient_value_or_key_outside_the_lake(scan: Scan) -> None:
    # The secret file is left out of the scan because it IS the secret; it must be owner-only.
    assert scan.credentials_mode == 0o600, f"credentials.json has mode {oct(scan.credentials_mode)}"
    print(f"scanned {scan.scanned}; birth dates inside the window skipped: {scan.skipped_births}")
    assert not scan.outside, "patient values or key material outside the lake:\n" + "\n".join(scan.outside)


def test_the_push_lane_leaks_nothing_and_its_inbox_is_private(scan: Scan) -> None:
    """The receiver's logs, refusals, the load's metadata and `webhook status` were scanned above;
    the inbox itself holds delivery bodies, so it is owner-only like the lake's data."""
    assert scan.pushed > 20, "the pusher delivered almost nothing: the push lane was not exercised"
    assert scan.scanned["webhook status"] == 1
    assert scan.inbox_modes["/"] == 0o700
    assert scan.inbox_modes["inbox.sqlite"] == 0o600
    assert all(mode == 0o600 for mode in scan.inbox_modes.values() if mode != 0o700), {
        name: oct(mode) for name, mode in scan.inbox_modes.items()
    }


def test_the_lake_catalog_is_protected_like_the_data(scan: Scan) -> None:
    """DuckLake keeps each data file's per-column min/max in its catalog (no option leaves them out),
    so the catalog holds patient values as the data does: the scan finds them there, and the catalog
    files must then be owner-only, like the lake's data (docs/operations.md)."""
    assert scan.catalog, "no patient value in the catalog: its statistics moved; revisit this test"
    assert scan.catalog_modes and all(mode == 0o600 for mode in scan.catalog_modes.values()), {
        name: oct(mode) for name, mode in scan.catalog_modes.items()
    }
