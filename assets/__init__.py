"""Dagster assets and asset checks, by stage: changes, extract (one op, an asset per stream), warehouse (load),
identity.

``build(partitions)`` makes them for one partitions definition; the code location
(pipelines/definitions.py) builds it from configuration, and the jobs and the runner use the same
object. ``all_assets`` and ``all_checks`` are a build with ``DEFAULT_START_DATE``, for tests and
benchmarks that materialize assets directly.
"""

import dataclasses

import dagster as dg

from assets.changes import build_changes_asset
from assets.checks import all_checks as _checks
from assets.extract import build_extract_assets
from assets.identity import identity_assets
from assets.partitions import DEFAULT_START_DATE, daily_partitions
from assets.push import pushed_deliveries
from assets.warehouse import build_load_asset
from transforms.streams import ENTITIES


@dataclasses.dataclass(frozen=True)
class Parts:
    partitions: dg.DailyPartitionsDefinition
    assets: list[dg.AssetsDefinition]
    checks: list[dg.AssetChecksDefinition]


def build(partitions: dg.DailyPartitionsDefinition) -> Parts:
    """Every asset and check of the pipeline, partitioned by ``partitions``."""
    assets = [
        build_changes_asset(partitions),
        build_extract_assets(partitions),
        *(build_load_asset(entity, partitions) for entity in ENTITIES),
        *identity_assets,
        pushed_deliveries,
    ]
    return Parts(partitions=partitions, assets=assets, checks=list(_checks))


_default = build(daily_partitions(DEFAULT_START_DATE))
all_assets = _default.assets
all_checks = _default.checks

__all__ = ["Parts", "all_assets", "all_checks", "build"]
