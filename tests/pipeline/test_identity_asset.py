"""Identity as a Dagster asset, end to end: sandbox on loopback -> real extract + load runs -> the
``person_crosswalk`` asset -> lake tables, views, checks and metadata; the crosswalk it writes is
measured here against the sandbox's ground truth (the asset itself knows nothing of the sandbox).

Then the properties a data team relies on: a rerun keeps every person_key, so does a rerun after the
sandbox's world moved on and new days were synced, and a decision a reviewer records (a 'no-link' on
a linked pair) splits that person on the next run and is logged in ``person_history``.
"""

import datetime as dt
import warnings
from typing import Any

import dagster as dg
import polars as pl
import pytest
from typer.testing import CliRunner

from assets import all_assets
from assets.identity import CHECKS, VIEWS
from pipelines.identity_cli import app as identity_app
from resources import all_resources
from resources.warehouse import Warehouse
from sandbox.server import serve_in_thread
from tests.identity_truth import assert_meets_bar, sandbox_metrics

pytestmark = [pytest.mark.slow, pytest.mark.integration]

IDENTITY_TABLES = ("person_crosswalk", "persons", "identity_review", "person_history", "identity_decisions")


def _materialize(
    instance: dg.DagsterInstance, selection: list[str], tags: dict[str, str] | None = None
) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = dg.materialize(
            all_assets,
            selection=selection,
            resources=all_resources(),
            instance=instance,
            tags=tags or {},
        )
    assert result.success
    return result


def _identity(instance: dg.DagsterInstance) -> tuple[dict[str, Any], dict[str, bool]]:
    result = _materialize(instance, ["person_crosswalk"])
    [materialization] = result.asset_materializations_for_node("person_crosswalk")
    metadata = {k: v.value for k, v in materialization.metadata.items()}
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    return metadata, checks


def _crosswalk(warehouse: Warehouse) -> pl.DataFrame:
    return warehouse.query("SELECT * FROM person_crosswalk").sort("source_surface", "source_id")


def test_identity_asset_links_keeps_keys_and_honours_decisions(tmp_path, monkeypatch):
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path))
    monkeypatch.setenv("REDOX_BUDGET_PATH", str(tmp_path / "budget.sqlite"))
    today = dt.datetime.now(dt.UTC).date()
    first, last = today - dt.timedelta(days=9), today - dt.timedelta(days=5)
    instance = dg.DagsterInstance.ephemeral()
    with serve_in_thread(
        state_dir=tmp_path / "sandbox", patients=400, seed=11, start=first, end=last, rate_limit=None
    ) as running:
        monkeypatch.setenv("REDOX_SANDBOX_CREDENTIALS", str(running.credentials_path))
        partitioned = [k.to_user_string() for a in all_assets if a.partitions_def is not None for k in a.keys]
        _materialize(
            instance,
            partitioned,
            tags={
                "dagster/asset_partition_range_start": first.isoformat(),
                "dagster/asset_partition_range_end": last.isoformat(),
            },
        )
        warehouse = Warehouse()

        # First run: trains a model, links, writes every table and view; its links meet the bar.
        meta, checks = _identity(instance)
        assert checks == dict.fromkeys(CHECKS, True), (checks, meta)
        assert "matches_sandbox_truth" not in checks and not any(k.startswith("truth_") for k in meta)
        assert meta["model"].startswith("trained")
        truth = sandbox_metrics(running.base_url, _crosswalk(warehouse))
        assert truth["true_pairs"] > 20, truth
        assert_meets_bar(truth)
        assert (
            meta["links"] == meta["links_identifier"] + meta["links_probabilistic"] + meta["links_decision"]
        )
        tables = set(warehouse.query("SELECT table_name FROM duckdb_tables()")["table_name"].to_list())
        assert {*IDENTITY_TABLES, "identity_model"} <= tables
        patients = warehouse.query("SELECT DISTINCT source_surface, source_id FROM patients")
        first_crosswalk = _crosswalk(warehouse)
        assert first_crosswalk.height == patients.height == meta["records"]
        assert first_crosswalk.select("source_surface", "source_id").is_unique().all()
        assert patients.join(first_crosswalk, on=["source_surface", "source_id"], how="anti").height == 0
        persons = warehouse.query("SELECT person_key FROM persons")
        assert persons.height == first_crosswalk["person_key"].n_unique() == meta["persons"]
        for view in VIEWS:
            rows = warehouse.query(f"SELECT count(*) AS n, count(person_key) AS keyed FROM {view}").row(0)
            assert rows[0] > 0 and rows[0] == rows[1], view  # every clinical row reaches its person

        # Second run on the same input: the stored model is reused and no key moves.
        meta, checks = _identity(instance)
        assert all(checks.values()), checks
        assert_meets_bar(sandbox_metrics(running.base_url, _crosswalk(warehouse)))
        assert meta["model"] == "reused"
        assert meta["person_keys_kept"] == meta["person_keys_before"] == meta["persons"]
        assert meta["history_events"] == 0
        assert (
            _crosswalk(warehouse)
            .select("source_surface", "source_id", "person_key")
            .equals(first_crosswalk.select("source_surface", "source_id", "person_key"))
        )

        # The world moves on (new patients, new visits, corrections); the new days are synced. New
        # records join or found persons and no existing record changes person.
        assert sum(running.world.advance(dt.timedelta(days=2)).values()) > 0
        _materialize(
            instance,
            partitioned,
            tags={
                "dagster/asset_partition_range_start": last.isoformat(),
                "dagster/asset_partition_range_end": (last + dt.timedelta(days=2)).isoformat(),
            },
        )
        before = meta
        meta, checks = _identity(instance)
        assert all(checks.values()), (checks, meta)
        assert_meets_bar(sandbox_metrics(running.base_url, _crosswalk(warehouse)))
        assert meta["records"] > before["records"], meta
        assert meta["person_keys_kept"] == meta["person_keys_before"] == before["persons"]
        assert meta["history_merge"] == meta["history_split"] == meta["history_move"] == 0, meta
        grown = _crosswalk(warehouse)
        kept = first_crosswalk.select("source_surface", "source_id", "person_key")
        assert kept.join(grown, on=["source_surface", "source_id", "person_key"], how="anti").height == 0
        first_crosswalk = grown

        # A reviewer says one linked pair is two people: the next run splits it and logs the split.
        pairs = (
            first_crosswalk.group_by("person_key")
            .agg(pl.col("source_surface"), pl.col("source_id"), pl.len())
            .filter(pl.col("len") == 2)
            .sort("person_key")
        )
        assert pairs.height > 0
        key, surfaces, ids, _ = pairs.row(0)
        singleton = first_crosswalk.group_by("person_key").len().filter(pl.col("len") == 1)["person_key"][0]
        cli = CliRunner()
        refused = cli.invoke(identity_app, ["decide", "no-link", "--person", singleton, "--by", "reviewer"])
        assert refused.exit_code != 0  # a one-record person has no pair to decide on; nothing recorded
        recorded = cli.invoke(
            identity_app,
            ["decide", "no-link", "--person", key, "--by", "test reviewer", "--note", "two people"],
        )
        assert recorded.exit_code == 0, recorded.output
        assert not any(i in recorded.output for i in ids)  # no record id on the terminal
        meta, checks = _identity(instance)
        assert all(checks.values()), checks
        # The truth says they are one human: measuring shows exactly that one lost link.
        truth = sandbox_metrics(running.base_url, _crosswalk(warehouse))
        assert truth["false_negatives"] == 1 and truth["false_positives"] == 0, truth
        assert meta["decisions_recorded"] == 1
        assert meta["history_split"] == 1
        after = _crosswalk(warehouse)
        split = after.join(
            pl.DataFrame({"source_surface": surfaces, "source_id": ids}), on=["source_surface", "source_id"]
        )
        assert split["person_key"].n_unique() == 2
        assert key in split["person_key"].to_list()  # one side keeps the key, the other gets a new one
        history = warehouse.query("SELECT * FROM person_history WHERE event = 'split'")
        assert history.height == 1 and history["other_person_key"][0] == key
        # Everyone else is untouched.
        others = after.filter(pl.col("person_key") != key).join(
            split, on=["source_surface", "source_id"], how="anti"
        )
        unchanged = first_crosswalk.filter(pl.col("person_key") != key)
        assert others.select("source_surface", "source_id", "person_key").equals(
            unchanged.select("source_surface", "source_id", "person_key")
        )

        # The decision holds on later runs: nothing moves back.
        meta, _ = _identity(instance)
        assert meta["history_events"] == 0, meta
        assert _crosswalk(warehouse).equals(after)
