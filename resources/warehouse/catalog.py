"""Where the DuckLake catalog lives, parsed from one setting, and how to ATTACH it.

Accepted forms of the catalog setting (``Warehouse.catalog`` or env ``REDOX_LAKE_CATALOG``):

- ``sqlite`` (default): ``<lake>/catalog.sqlite``; many local processes, one machine;
- ``sqlite:<path>``: a SQLite catalog elsewhere on this machine;
- ``postgres:<libpq conninfo>`` (or ``postgresql:``): a shared catalog, e.g.
  ``postgres:dbname=lake host=db.internal user=etl``; the password comes from ``PGPASSWORD`` or
  ``~/.pgpass``, never from this string, though one given here is accepted and always redacted.

Invariant: ``describe()`` is the only rendering of a spec that is ever logged or shown, and it never
contains a password.
"""

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Literal

CatalogKind = Literal["sqlite", "postgres"]

SQLITE_FILE = "catalog.sqlite"

_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_PASSWORD_URI = re.compile(r"(postgres(?:ql)?://[^:/@\s]+:)([^@\s]+)(@)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True, slots=True)
class CatalogSpec:
    kind: CatalogKind
    target: str  # a SQLite file path, or a libpq conninfo string / URI

    @property
    def extensions(self) -> tuple[str, ...]:
        """DuckDB extensions this catalog needs besides ducklake itself."""
        return ("sqlite_scanner",) if self.kind == "sqlite" else ("postgres_scanner",)

    @property
    def attach_uri(self) -> str:
        return f"ducklake:{self.kind}:{self.target}"

    @property
    def sqlite_path(self) -> Path | None:
        return Path(self.target) if self.kind == "sqlite" else None

    def exists(self) -> bool | None:
        """Whether the catalog already exists, when that is knowable without connecting (SQLite)."""
        path = self.sqlite_path
        return path.exists() if path is not None else None

    def describe(self) -> str:
        """The spec as it may be logged: passwords replaced by ``***``."""
        return f"{self.kind}:{redact(self.target)}"


def redact(conninfo: str) -> str:
    """A conninfo string or URI with any password replaced by ``***``."""
    return _PASSWORD_URI.sub(r"\1***\3", _PASSWORD_KV.sub(r"\1***", conninfo))


def parse_catalog(value: str | None, lake_dir: Path) -> CatalogSpec:
    """Parse the catalog setting; ``None``/empty/``sqlite`` means ``<lake_dir>/catalog.sqlite``."""
    text = (value or "").strip()
    if text in ("", "sqlite"):
        return CatalogSpec("sqlite", str((lake_dir / SQLITE_FILE).resolve()))
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    rest = rest.strip()
    if sep and scheme == "sqlite":
        if not rest:
            raise ValueError("catalog 'sqlite:' needs a file path, e.g. sqlite:/srv/lake/catalog.sqlite")
        return CatalogSpec("sqlite", str(Path(rest).expanduser().resolve()))
    if sep and scheme in ("postgres", "postgresql"):
        # `postgresql://...` arrives here as scheme "postgresql" with rest "//..."
        conninfo = f"{scheme}:{rest}" if rest.startswith("//") else rest
        _validate_conninfo(conninfo)
        return CatalogSpec("postgres", conninfo)
    raise ValueError(
        f"unsupported catalog setting {redact(text)!r}: use 'sqlite', 'sqlite:<path>' or "
        "'postgres:<libpq conninfo>' (e.g. postgres:dbname=lake host=db.internal user=etl)"
    )


def conninfo_params(conninfo: str) -> dict[str, str]:
    """The ``key=value`` pairs of a libpq conninfo string (values may be single-quoted)."""
    lexer = shlex.shlex(conninfo, posix=True)
    lexer.whitespace_split = True
    lexer.quotes = "'"
    params: dict[str, str] = {}
    for token in lexer:
        key, sep, val = token.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"malformed conninfo element {redact(token)!r}: expected key=value")
        params[key.strip().lower()] = val
    return params


def _validate_conninfo(conninfo: str) -> None:
    if not conninfo:
        raise ValueError("catalog 'postgres:' needs a conninfo, e.g. postgres:dbname=lake host=localhost")
    if conninfo.lower().startswith(("postgres://", "postgresql://")):
        return
    params = conninfo_params(conninfo)
    if "dbname" not in params:
        raise ValueError(
            "the Postgres catalog conninfo must name its database (dbname=...): DuckLake creates its "
            "tables in that database, and libpq's default (the user's name) is rarely intended"
        )
