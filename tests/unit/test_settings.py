"""The one settings model: .env.example matches it, secrets stay secret, errors say what to fix,
and the resources are built from it."""

import re
from pathlib import Path

import dagster as dg
import pytest
from pydantic import SecretStr

from resources import all_resources, configured_warehouse
from resources.redox.resource import SECRET_FIELDS, RedoxResource
from resources.settings import Settings, SettingsError, budget_path, home, lake_dir, sandbox_dir, variables

ENV_EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"
ASSIGNMENT = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")


def _example() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := ASSIGNMENT.match(line.strip()):
            found.setdefault(match.group(1), match.group(2).strip())
    return found


def test_env_example_lists_every_variable_with_its_default():
    example = _example()
    missing = [name for name, _ in variables() if name not in example]
    assert not missing, f"add these to .env.example: {missing}"
    for name, info in variables():
        if info.default is None or not example[name]:
            continue
        field = next(k for k, v in Settings.model_fields.items() if v is info)
        shown = getattr(Settings.from_env({name: example[name]}), field)
        assert shown == info.default, (
            f".env.example shows {name}={example[name]}, the default is {info.default}"
        )


def test_env_example_names_no_unknown_variable():
    known = {name for name, _ in variables()}
    assert not set(_example()) - known


def test_every_variable_is_described():
    for name, info in variables():
        assert info.description, f"{name} needs a description"


def test_secrets_are_secret_and_never_shown():
    secrets = {
        "REDOX_PRIVATE_KEY": "pem-body-123",
        "REDOX_NEXT_PRIVATE_KEY": "pem-body-456",
        "REDOX_API_KEY": "ak-123",
        "REDOX_API_SECRET": "s3cr3t!",
        "REDOX_BUDGET_URL": "redis://:pw-789@cache:6379/0",
        "REDOX_LAKE_CATALOG": "postgres:dbname=lake password=pg-pass",
    }
    settings = Settings.from_env(secrets)
    text = repr(settings) + str(settings) + str(settings.model_dump())
    assert not any(value in text for value in secrets.values())
    for name, info in variables():
        if name in secrets:
            assert info.annotation == SecretStr | None, name


def test_budget_url_given_as_backend_is_held_as_a_secret():
    settings = Settings.from_env({"REDOX_BUDGET_BACKEND": "rediss://:pw-789@cache:6379/0"})
    assert settings.budget_backend == "redis"
    assert settings.budget_url is not None and "pw-789" not in repr(settings)


def test_errors_name_the_variable_and_the_fix_without_the_value():
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {"REDOX_MAX_IN_FLIGHT": "zero-7", "REDOX_ENVIRONMENT": "prod-xyz", "REDOX_ETL_START_DATE": "soon"}
        )
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    for name in ("REDOX_MAX_IN_FLIGHT", "REDOX_ENVIRONMENT", "REDOX_ETL_START_DATE"):
        assert any(line.startswith(f"{name}: ") and "Fix:" in line for line in lines)
    assert not any(value in str(info.value) for value in ("zero-7", "prod-xyz", "soon"))


def test_a_given_mapping_is_the_whole_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REDOX_MAX_IN_FLIGHT", "3")
    assert Settings.from_env().max_in_flight == 3
    assert Settings.from_env({}).max_in_flight == 256
    # Empty counts as unset, as a line like `REDOX_FHIR_PAGE_SIZE=` in a .env means.
    assert Settings.from_env({"REDOX_FHIR_PAGE_SIZE": ""}).fhir_page_size == 200


def test_locations_derive_from_the_home(monkeypatch, tmp_path):
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path / "state"))
    for name in ("REDOX_ETL_LAKE", "REDOX_BUDGET_PATH", "DAGSTER_HOME"):
        monkeypatch.delenv(name, raising=False)
    state = tmp_path / "state"
    assert home() == state and state.stat().st_mode & 0o777 == 0o700
    assert lake_dir() == state / "lake"
    assert budget_path() == state / "budget.sqlite"
    assert sandbox_dir() == state / "sandbox"
    assert Settings.from_env().dagster_dir == state / "dagster"
    monkeypatch.setenv("REDOX_ETL_LAKE", str(tmp_path / "elsewhere"))
    assert lake_dir() == tmp_path / "elsewhere"


def test_start_date_defaults_to_the_first_partition_day():
    assert Settings.from_env({}).start_date.isoformat() == "2025-01-01"
    assert Settings.from_env({"REDOX_ETL_START_DATE": "2024-06-01"}).start_date.isoformat() == "2024-06-01"


def test_redox_resource_fields_are_settings_fields():
    for name, field in RedoxResource.model_fields.items():
        assert name in Settings.model_fields, name
        assert str(Settings.model_fields[name].validation_alias) in (field.description or "")
    assert set(SECRET_FIELDS) <= set(RedoxResource.model_fields)


def test_all_resources_binds_values_and_secrets_only_by_name(tmp_path):
    settings = Settings.from_env(
        {
            "REDOX_ETL_HOME": str(tmp_path),
            "REDOX_BASE_URL": "https://api.redoxengine.com/",
            "REDOX_API_KEY": "ak-123",
            "REDOX_RATE_LIMIT": "600/30",
            "REDOX_MAX_IN_FLIGHT": "4",
            "REDOX_LAKE_CATALOG": "postgres:dbname=lake password=pg-pass",
            "REDOX_LAKE_DATA_PATH": str(tmp_path / "data"),
        }
    )
    resources = all_resources(settings)
    redox, landing, warehouse = resources["redox"], resources["landing"], resources["warehouse"]
    assert redox.base_url == "https://api.redoxengine.com"
    assert redox.rate_limit == "600/30" and redox.max_in_flight == 4
    assert redox.fhir_org is None  # unset: the environment's value when the client is built
    assert isinstance(redox.api_key, dg.EnvVar) and redox.api_key.env_var_name == "REDOX_API_KEY"
    assert landing.root == warehouse.lake_dir == str(tmp_path / "lake")
    assert isinstance(warehouse.catalog, dg.EnvVar)
    assert warehouse.data_path == str(tmp_path / "data")
    assert not any(secret in repr(resources) for secret in ("ak-123", "pg-pass"))
    # A budget URL may come from REDOX_BUDGET_BACKEND, so it is left to Settings at use, not bound.
    url_in_backend = Settings.from_env({"REDOX_BUDGET_BACKEND": "redis://:pw-789@cache:6379/0"})
    assert RedoxResource.from_settings(url_in_backend).budget_url is None
    # Outside Dagster nothing resolves an EnvVar, so the CLI's warehouse gets the value itself.
    assert configured_warehouse(settings).catalog == "postgres:dbname=lake password=pg-pass"
    assert configured_warehouse(settings, lake_dir="/x").lake_dir == "/x"


def test_unset_home_leaves_the_lake_to_the_environment_at_use(monkeypatch, tmp_path):
    resources = all_resources(Settings.from_env({}))
    assert resources["landing"].root is None and resources["warehouse"].lake_dir is None
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path))
    monkeypatch.delenv("REDOX_ETL_LAKE", raising=False)
    assert resources["landing"].zone().root == tmp_path / "lake"
