"""schema/descriptions.py says what the data dictionary says, for every table, view and column."""

from assets.identity import IDENTITY_MODEL, VIEWS
from resources.warehouse import lake_schemas
from schema.descriptions import COLUMN_DESCRIPTIONS, TABLE_DESCRIPTIONS
from tests.data_dictionary import parse
from transforms.identity.tables import TABLES as IDENTITY_TABLES


def test_the_descriptions_are_the_data_dictionary() -> None:
    tables, columns = parse()
    assert tables == TABLE_DESCRIPTIONS
    assert columns == COLUMN_DESCRIPTIONS


def test_every_lake_table_view_and_column_is_described() -> None:
    schemas = {**lake_schemas(), **IDENTITY_TABLES, "identity_model": dict(IDENTITY_MODEL)}
    for table, columns in schemas.items():
        assert TABLE_DESCRIPTIONS.get(table), f"{table}: no description in docs/data-dictionary.md"
        described = COLUMN_DESCRIPTIONS.get(table, {})
        missing = [c for c in columns if not described.get(c)]
        assert not missing, f"{table}: columns without a meaning in docs/data-dictionary.md: {missing}"
        extra = sorted(set(described) - set(columns))
        assert not extra, f"{table}: the dictionary describes columns the table lacks: {extra}"
    for view in VIEWS:
        assert TABLE_DESCRIPTIONS.get(view), view
