"""Loading DuckDB extensions without the network: the one place that knows where their binaries are.

The machines this project runs on often reach only the Python package index, so each extension the
lake needs is shipped as a wheel (``duckdb-extension-<name>``) that carries DuckDB's signed binary at
``<package>/extensions/v<duckdb version>/<name>.duckdb_extension``. The wheel's binary is tried first,
then an extension already installed in DuckDB's extension directory, then a normal ``INSTALL``
(which needs extensions.duckdb.org).

Invariant: an extension is either loaded, or the caller gets one error naming the extension, every
path tried and the two ways to fix it; never a half-configured connection.
"""

import importlib.util
from collections.abc import Iterable
from pathlib import Path

import duckdb


class ExtensionUnavailableError(RuntimeError):
    """A DuckDB extension could not be loaded from the wheel, the local install or the network."""


def wheel_binary(name: str) -> Path | None:
    """The signed binary shipped in the ``duckdb-extension-<name>`` wheel for this DuckDB, if any."""
    spec = importlib.util.find_spec(f"duckdb_extension_{name}")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
        if candidate.is_file():
            return candidate
    return None


def _loaded(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute("SELECT extension_name, aliases FROM duckdb_extensions() WHERE loaded").fetchall()
    names: set[str] = set()
    for extension_name, aliases in rows:
        names.add(extension_name)
        names.update(aliases or ())
    return names


def load_extensions(con: duckdb.DuckDBPyConnection, names: Iterable[str]) -> None:
    """Load each extension into ``con``: wheel binary first, then local install, then ``INSTALL``."""
    already = _loaded(con)
    for name in names:
        if name in already:
            continue
        attempts: list[str] = []
        binary = wheel_binary(name)
        if binary is not None:
            try:
                con.execute(f"LOAD '{_quote(str(binary))}'")
                continue
            except duckdb.Error as exc:
                attempts.append(f"wheel binary {binary}: {exc}")
        else:
            attempts.append(f"no wheel duckdb-extension-{name}=={duckdb.__version__} installed")
        try:
            con.execute(f"LOAD {name}")
            continue
        except duckdb.Error as exc:
            attempts.append(f"LOAD {name} from the extension directory: {exc}")
        try:
            con.execute(f"INSTALL {name}")
            con.execute(f"LOAD {name}")
            continue
        except duckdb.Error as exc:
            attempts.append(f"INSTALL {name} from the extension repository: {exc}")
        raise ExtensionUnavailableError(
            f"DuckDB extension {name!r} could not be loaded. Either install the pinned wheel "
            f"(`uv sync --frozen` installs duckdb-extension-{name.replace('_', '-')}=={duckdb.__version__}) "
            "or allow this machine to reach extensions.duckdb.org. Tried: " + "; ".join(attempts)
        )


def storage_extensions(location: str) -> tuple[str, ...]:
    """Extensions a data path needs: httpfs for S3/GCS/R2/HTTP, azure for Azure; none for a folder."""
    scheme = location.partition("://")[0].lower() if "://" in location else ""
    if scheme in ("s3", "s3a", "s3n", "gs", "gcs", "r2", "http", "https", "hf"):
        return ("httpfs",)
    if scheme in ("az", "azure", "abfss"):
        return ("azure",)
    return ()


def _quote(text: str) -> str:
    return text.replace("'", "''")
