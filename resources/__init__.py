"""Dagster resources: clients and stores, never business rules."""

from typing import Any

from resources.landing import LandingResource
from resources.redox.resource import RedoxResource
from resources.warehouse import Warehouse


def all_resources() -> dict[str, Any]:
    """The resources every asset may ask for, configured from the environment."""
    return {"redox": RedoxResource(), "landing": LandingResource(), "warehouse": Warehouse()}
