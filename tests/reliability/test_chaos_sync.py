"""Chaos: a real Dagster sync against a sandbox that injects every fault kind ends equal to truth.

The sandbox (sandbox/faults.py) answers clinical requests with server errors, hangs past the
client's read timeout, spurious 429s, records repeated across pages, malformed records and slow
answers, and its tokens live a few seconds. The client's bounded retries must absorb all of it, so
the lake ends equal to the sandbox's truth for the window except the records the sandbox broke, each
of which is in ``quarantine`` with a reason. Counts reconcile (fetched = loaded + duplicates +
quarantined) in the ``records_accounted`` checks, in ``partition_loads`` and against the tables
themselves, and ``api_calls`` shows the retries. The sandbox's stats prove every fault fired, so the
test cannot pass on a quiet day.

The sync runs with the project's asset checks, as the production job does. One sync serves every
test in the module (a module fixture, one xdist group): each test states one property, so a failure
names the property that broke.
"""

import collections
import dataclasses
import datetime as dt
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import polars as pl
import pytest

from assets import all_assets, all_checks
from resources import all_resources
from resources.warehouse import Warehouse
from sandbox.server import serve_in_thread
from tests.pipeline.truth import COMPARED, KEY, expected, lake_rows, referenced, scope_datamodel_ids

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.xdist_group("chaos")]

# Rates high enough that each kind fires several times in the run's ~150 clinical requests
# (requests run concurrently, so which request meets which fault varies between runs), low enough
# that eight attempts per request always get through. A hang outlasts the client's read timeout
# (set below); a slow answer stays well inside it, even on a busy machine, because a reply the
# client gave up on would still be named by the sandbox as served (and maybe broken).
FAULTS = "5xx=0.06,timeout=0.08:4s,429=0.06,dup=0.12,malformed=0.08,slow=0.12:250ms,seed=23"
FAULT_KINDS = ("5xx", "timeout", "429", "dup", "malformed", "slow")
READ_TIMEOUT_S = 2.5
# Shorter than the run, so the client must renew its token while requests are in flight.
TOKEN_TTL_S = 5

# Where each broken wire record lands (sandbox `malformed` stats -> unified table).
TABLE_OF = {
    ("fhir", "Patient"): "patients",
    ("fhir", "Encounter"): "encounters",
    ("fhir", "Observation"): "results",
    ("fhir", "Appointment"): "appointments",
    ("datamodel", "Visit"): "encounters",
    ("datamodel", "Booking"): "appointments",
    ("datamodel", "Result"): "results",
}
CLINICAL = ("encounters", "results", "appointments")

# Checks that cannot pass here for reasons that are not faults: a broken patient leaves the records
# that point at it without one (WARN), and the window ends days ago, so the lake is not "fresh".
EXPECTED_TO_FAIL = {"patient_exists", "fresh"}
BUNDLE_TOTALS = [d for d in all_checks if any(spec.name == "bundle_totals" for spec in d.check_specs)]


@dataclasses.dataclass
class Chaos:
    home: Path
    result: dg.ExecuteInProcessResult
    stats: dict[str, Any]
    truth: dict[str, pl.DataFrame]
    first: dt.date
    last: dt.date

    def broken(self) -> pl.DataFrame:
        """Every record the sandbox served broken: source_surface, table, source_id, mode."""
        rows = [
            {
                "source_surface": m["surface"],
                "table": TABLE_OF[(m["surface"], m["resource"])],
                "source_id": m["source_id"],
                "mode": m["mode"],
            }
            for m in self.stats["malformed"]
        ]
        schema = {"source_surface": pl.String, "table": pl.String, "source_id": pl.String, "mode": pl.String}
        return pl.DataFrame(rows, schema=schema).unique()

    def broken_keys(self, table: str) -> pl.DataFrame:
        """The lake keys of the records served broken: Data Model clinical ids scoped by patient as
        the lake keys them, and a broken panel's component rows with it."""
        keys = self.broken().filter(pl.col("table") == table).select(KEY).unique()
        if table == "patients":
            return keys
        truth = self.truth[table]
        rows = truth.join(keys, on=KEY)
        if "parent_source_id" in truth.columns:
            parts = truth.join(
                keys.rename({"source_id": "parent_source_id"}), on=["source_surface", "parent_source_id"]
            )
            rows = pl.concat([rows, parts])
        return scope_datamodel_ids(rows).select(KEY).unique()

    def accounted(self) -> dict[str, dg.AssetCheckEvaluation]:
        """The load assets' ``records_accounted`` evaluations, by table."""
        return {
            c.asset_key.to_user_string(): c
            for c in self.result.get_asset_check_evaluations()
            if c.check_name == "records_accounted"
        }


def _counts(check: dg.AssetCheckEvaluation) -> dict[str, int]:
    return {name: entry.value for name, entry in check.metadata.items() if isinstance(entry.value, int)}


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    home = tmp_path_factory.mktemp("chaos")
    today = dt.datetime.now(dt.UTC).date()
    first, last = today - dt.timedelta(days=9), today - dt.timedelta(days=5)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("REDOX_ETL_HOME", str(home))
        env.setenv("REDOX_BUDGET_PATH", str(home / "budget.sqlite"))
        env.setenv("REDOX_READ_TIMEOUT", str(READ_TIMEOUT_S))
        env.setenv("REDOX_RETRY_ATTEMPTS", "8")
        env.setenv("REDOX_RETRY_TIMEOUT", "120")
        # A short window: the budget's slowdown after a 429 lasts a tenth of it, seconds rather than
        # the minutes Redox's 300 s window would cost.
        env.setenv("REDOX_RATE_LIMIT", "3000/30")
        # Tiny pages: many next links, so records repeat across pages and many pages can break.
        env.setenv("REDOX_FHIR_PAGE_SIZE", "2")
        with serve_in_thread(
            state_dir=home / "sandbox",
            patients=120,
            seed=11,
            start=first,
            end=last,
            rate_limit=None,
            faults=FAULTS,
            token_ttl=TOKEN_TTL_S,
        ) as running:
            env.setenv("REDOX_SANDBOX_CREDENTIALS", str(running.credentials_path))
            tags = {
                "dagster/asset_partition_range_start": first.isoformat(),
                "dagster/asset_partition_range_end": last.isoformat(),
            }
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # With every check, as daily_sync runs them: bundle_totals is blocking, so a record
                # repeated across pages must not stop that day's loads.
                result = dg.materialize(
                    [*all_assets, *all_checks],
                    resources=all_resources(),
                    instance=dg.DagsterInstance.ephemeral(),
                    tags=tags,
                    raise_on_error=False,
                )
            stats = httpx.get(f"{running.base_url}/sandbox/stats", timeout=30).json()
            # Shown with a failure: what this run met (counts and templates only).
            print("faults:", stats["faults"], "requests:", stats["requests"]["by_endpoint"])
            yield Chaos(home, result, stats, running.world.truth(), first, last)


def _fhir_served(home: Path) -> collections.Counter[tuple[str, str]]:
    """How often each FHIR (resource type, id) was landed, intact or not, read from the raw pages."""
    served: collections.Counter[tuple[str, str]] = collections.Counter()
    for path in home.glob("**/raw/fhir/*/day=*/pages*.parquet"):
        for body in pl.read_parquet(path, columns=["body"])["body"]:
            for entry in json.loads(body).get("entry") or []:
                resource, source_id = entry["fullUrl"].rsplit("/", 2)[-2:]
                served[(resource, source_id)] += 1
    return served


def _differing(got: pl.DataFrame, want: pl.DataFrame, columns: list[str]) -> dict[str, int]:
    """How many rows of ``got`` differ from ``want`` in each column (counts only: values are PHI)."""
    joined = got.join(want, on=KEY, how="inner", suffix="_want")
    out = {}
    for column in columns:
        have, truth = pl.col(column), pl.col(f"{column}_want")
        if joined.schema[f"{column}_want"].is_float():
            # The tolerance assert_frame_equal uses by default.
            same = (have.cast(pl.Float64) - truth).abs() <= 1e-8 + 1e-5 * truth.abs()
        else:
            same = have.cast(joined.schema[f"{column}_want"], strict=False) == truth
        both_null = have.is_null() & truth.is_null()
        n = joined.filter(~(both_null | same.fill_null(False))).height
        if n:
            out[column] = n
    return out


def test_the_run_succeeds_and_every_fault_fired(chaos: Chaos) -> None:
    assert chaos.result.success
    failed = [
        f"{c.asset_key.to_user_string()}:{c.check_name}"
        for c in chaos.result.get_asset_check_evaluations()
        if not c.passed and c.check_name not in EXPECTED_TO_FAIL
    ]
    assert not failed, f"asset checks failed under faults: {failed}"
    fired = chaos.stats["faults"]
    assert all(fired.get(kind, 0) > 0 for kind in FAULT_KINDS), fired
    tokens = chaos.stats["requests"]["by_endpoint"]["POST /v2/auth/token"].get("200", 0)
    assert tokens >= 2, "the short token lifetime never made the client renew its token"


def test_broken_records_are_real_records(chaos: Chaos) -> None:
    """The sandbox names records of its own truth, so the expectations below are about real rows."""
    broken = chaos.broken()
    for table in COMPARED:
        named = broken.filter(pl.col("table") == table).select(KEY)
        unknown = named.join(chaos.truth[table].select(KEY), on=KEY, how="anti")
        assert unknown.is_empty(), f"{table}: {unknown.height} broken record(s) not in truth"


def test_tables_equal_truth_apart_from_broken_records(chaos: Chaos) -> None:
    want = expected(chaos.truth, chaos.first, chaos.last)
    warehouse = Warehouse()
    served = _fhir_served(chaos.home)
    fhir_type = {table: resource for (surface, resource), table in TABLE_OF.items() if surface == "fhir"}
    intact = {table: want[table].join(chaos.broken_keys(table), on=KEY, how="anti") for table in CLINICAL}
    # A patient only a broken record points at may never be asked for: it is not required.
    required_patients = want["patients"].join(referenced(intact), on=KEY, how="semi")
    for table, columns in COMPARED.items():
        got = lake_rows(warehouse, table, chaos.first, chaos.last)
        wanted = want[table].select(KEY + columns)
        assert got.height == got.select(KEY).unique().height, f"{table}: duplicate keys"
        extra = got.join(wanted, on=KEY, how="anti")
        assert extra.is_empty(), f"{table}: {extra.height} row(s) that truth does not have in the window"
        # Every row that is there holds exactly truth's values: a broken copy never reached a table.
        differing = _differing(got, wanted, columns)
        assert not differing, f"{table}: rows that differ from truth, by column: {differing}"
        required = required_patients if table == "patients" else wanted
        missing = required.select(KEY).join(got.select(KEY), on=KEY, how="anti")
        not_broken = missing.join(chaos.broken_keys(table), on=KEY, how="anti")
        assert not_broken.is_empty(), (
            f"{table}: {not_broken.height} record(s) missing that were served intact: "
            f"{not_broken['source_surface'].value_counts().rows()}"
        )
        # A broken record is loaded only if the server also sent it intact: on the Data Model each
        # record is served once per run; on FHIR a repeated page boundary can serve it twice.
        loaded_broken = chaos.broken_keys(table).join(got.select(KEY), on=KEY, how="semi")
        for surface, source_id in loaded_broken.iter_rows():
            # A component row was served inside its panel: the panel's id counts.
            served_as = source_id.split("/component/")[0]
            assert surface == "fhir" and served[(fhir_type[table], served_as)] >= 2, (
                f"{table}: a {surface} record served only broken was loaded"
            )


def test_no_duplicate_keys(chaos: Chaos) -> None:
    warehouse = Warehouse()
    for table in COMPARED:
        counts = warehouse.query(
            f"SELECT count(*) AS n, count(DISTINCT (source_surface, source_id)) AS keys FROM {table}"
        )
        assert counts["n"][0] == counts["keys"][0], f"{table}: duplicate keys"


def test_every_broken_record_is_quarantined_with_a_reason(chaos: Chaos) -> None:
    quarantine = Warehouse().query("SELECT source_surface, entity, source_id, reason FROM quarantine")
    assert quarantine.height > 0
    assert (quarantine["reason"].str.strip_chars().str.len_chars() > 0).all(), (
        "a quarantine row without a reason"
    )
    broken = chaos.broken().rename({"table": "entity"})
    # Some breaks take the id off the wire: a Data Model record without its id, or an order whose
    # Results is no list (its results cannot even be told apart). Those leave quarantine rows
    # without an id; every other broken record must be found in quarantine by its id.
    idless = (pl.col("source_surface") == "datamodel") & (
        (pl.col("mode") == "missing-required")
        | ((pl.col("entity") == "results") & (pl.col("mode") == "wrong-type"))
    )
    where = ["source_surface", "entity", "source_id"]
    unquarantined = broken.filter(~idless).join(quarantine.drop_nulls("source_id"), on=where, how="anti")
    assert unquarantined.is_empty(), (
        f"{unquarantined.height} broken record(s) not in quarantine: "
        f"{unquarantined.group_by('source_surface', 'entity').len().rows()}"
    )
    anonymous = quarantine.filter(pl.col("source_id").is_null()).group_by("source_surface", "entity").len()
    expected_anonymous = broken.filter(idless).group_by("source_surface", "entity").len()
    assert sorted(anonymous.select("source_surface", "entity").rows()) == sorted(
        expected_anonymous.select("source_surface", "entity").rows()
    ), f"quarantine rows without an id: {anonymous.rows()}; id-less breaks: {expected_anonymous.rows()}"
    # Nothing intact is quarantined: every row with an id is a record the sandbox broke.
    stray = quarantine.drop_nulls("source_id").join(broken, on=where, how="anti")
    assert stray.is_empty(), (
        f"{stray.height} intact record(s) quarantined: {stray['entity'].value_counts().rows()}"
    )


def test_counts_reconcile(chaos: Chaos) -> None:
    accounted = chaos.accounted()
    assert set(accounted) == set(COMPARED)
    for table, check in accounted.items():
        counts = _counts(check)
        assert check.passed, f"{table}: records_accounted failed: {counts}"
        assert counts["records"] == (
            counts["loaded"] + counts["duplicates"] + counts["quarantined"] + counts["known_references"]
        ), table
    warehouse = Warehouse()
    loads = warehouse.query(
        "SELECT table_name, source_surface, count(*) AS loads, count(DISTINCT partition_day) AS days,"
        " sum(rows)::BIGINT AS rows, sum(quarantined)::BIGINT AS quarantined FROM partition_loads GROUP BY ALL"
    )
    days = (chaos.last - chaos.first).days + 1
    assert loads.height == 2 * len(COMPARED)
    assert (loads["loads"] == days).all() and (loads["days"] == days).all(), (
        "a partition loaded twice or not at all"
    )
    quarantine = warehouse.query(
        "SELECT entity AS table_name, source_surface, count(*)::BIGINT AS n FROM quarantine GROUP BY ALL"
    )
    for table, check in accounted.items():
        mine = loads.filter(pl.col("table_name") == table)
        counts = _counts(check)
        # partition_loads counts every merged row: records and the component rows beside them.
        assert int(mine["rows"].sum()) == counts["loaded"] + counts.get("components", 0), table
        assert int(mine["quarantined"].sum()) == counts["quarantined"], table
        held = quarantine.filter(pl.col("table_name") == table)
        assert int(held["n"].sum()) == counts["quarantined"], f"{table}: quarantine table != partition_loads"
    # A clinical record is merged once per run (its one day), so rows merged = rows in the table.
    for table in CLINICAL:
        for surface in ("fhir", "datamodel"):
            merged = loads.filter((pl.col("table_name") == table) & (pl.col("source_surface") == surface))
            rows = lake_rows(warehouse, table, chaos.first, chaos.last).filter(
                pl.col("source_surface") == surface
            )
            assert int(merged["rows"].sum()) == rows.height, f"{table} {surface}: merged rows != rows held"


def test_api_calls_show_the_retries(chaos: Chaos) -> None:
    calls = Warehouse().query("SELECT surface, status, attempt FROM api_calls")
    clinical = calls.filter(pl.col("surface") != "auth")
    assert (clinical["attempt"] > 1).sum() > 0, "no retried request"
    statuses = set(clinical["status"].to_list())
    assert statuses & {500, 502, 504}, "no server error recorded"
    assert 429 in statuses, "no 429 recorded"
    assert None in statuses, "no timed-out attempt recorded (status NULL)"
    # Faults are 5xx, 429 and hangs: no other refusal (a 401 is a token that expired in flight).
    refused = calls.filter(pl.col("status").is_between(400, 499) & ~pl.col("status").is_in([401, 429]))
    assert refused.is_empty(), refused["status"].value_counts().rows()


def test_bundle_totals_tolerate_records_repeated_across_pages(chaos: Chaos) -> None:
    evaluations = [e for e in chaos.result.get_asset_check_evaluations() if e.check_name == "bundle_totals"]
    days = (chaos.last - chaos.first).days + 1
    # A check that did not run over the whole window proves nothing.
    if len(evaluations) != len(BUNDLE_TOTALS) or any(_counts(e)["days_checked"] != days for e in evaluations):
        pytest.fail(f"bundle_totals did not check the window: {[_counts(e) for e in evaluations]}")
    served = _fhir_served(chaos.home)
    repeated = sum(n - 1 for (resource, _), n in served.items() if resource != "Patient")
    assert repeated, "no clinical FHIR record was repeated across pages: the dup fault did not fire"
    failed = {e.asset_key.to_user_string(): _counts(e) for e in evaluations if not e.passed}
    assert not failed, f"bundle_totals failed with {repeated} clinical FHIR entries landed twice: {failed}"
