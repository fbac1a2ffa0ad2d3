"""Read docs/data-dictionary.md into table and column descriptions (for tests that keep
schema/descriptions.py equal to it). Only a test helper: the product never reads the docs."""

import re
from pathlib import Path

DICTIONARY = Path(__file__).resolve().parents[1] / "docs" / "data-dictionary.md"
_HEADING = re.compile(r"^#{2,3} (?P<names>[a-z_]+(?:, [a-z_]+)*)\s*$")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
# Added at load to these tables (the "Lineage columns" section says so in words).
LINEAGE_TABLES = ("patients", "encounters", "results", "appointments", "quarantine")


def clean(text: str) -> str:
    """Markdown to plain text: links keep their words, emphasis and code marks go."""
    text = _LINK.sub(r"\1", text)
    return re.sub(r"\s+", " ", text.replace("**", "").replace("`", "")).strip()


def parse(path: Path = DICTIONARY) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(table -> description, table -> column -> meaning) as the dictionary states them.

    A section's first paragraph describes its table(s); each row of its first markdown table with
    a ``column | type | meaning`` header names one column or several (``a, b``) and its meaning.
    """
    tables: dict[str, str] = {}
    columns: dict[str, dict[str, str]] = {}
    names: list[str] = []
    paragraph: list[str] = []
    in_table = False
    lineage: dict[str, str] = {}
    for line in path.read_text().splitlines():
        heading = re.match(r"^#{2,3} ", line)
        if heading:
            match = _HEADING.match(line)
            section = line.lstrip("#").strip()
            names = (
                match["names"].split(", ")
                if match
                else (["_lineage"] if section == "Lineage columns" else [])
            )
            paragraph, in_table = [], False
            continue
        if not names:
            continue
        if line.startswith("| column | type | meaning"):
            in_table = True
            continue
        if line.startswith("|"):
            if not in_table or line.startswith("|---"):
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            meaning = clean(cells[2]) if len(cells) > 2 else ""
            for column in (c.strip("` ") for c in cells[0].split(",")):
                for name in names:
                    target = lineage if name == "_lineage" else columns.setdefault(name, {})
                    target[column] = meaning
            continue
        if in_table:
            names, in_table = [], False
            continue
        if line.strip() and not line.startswith("```"):
            if not any(n in tables for n in names):
                paragraph.append(line)
        elif paragraph:
            for name in names:
                if name != "_lineage":
                    tables.setdefault(name, clean(" ".join(paragraph)))
            paragraph = []
    for table in LINEAGE_TABLES:
        for column, meaning in lineage.items():
            if table == "quarantine" and meaning.startswith("(the four unified tables only)"):
                continue
            columns.setdefault(table, {}).setdefault(column, meaning)
    return tables, columns
