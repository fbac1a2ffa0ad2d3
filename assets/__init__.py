"""Dagster assets, by stage: changes, extract (per surface x entity), warehouse (load), identity."""

from assets.changes import redox_changes
from assets.checks import all_checks
from assets.extract import extract_assets
from assets.identity import identity_assets
from assets.warehouse import load_assets

all_assets = [redox_changes, *extract_assets, *load_assets, *identity_assets]

__all__ = ["all_assets", "all_checks"]
