"""The lake's data files in an S3-compatible bucket: the credentials DuckDB's httpfs signs with.

DuckLake keeps only paths in its catalog; every process that reads or writes Parquet under an
``s3://`` data path needs its own S3 secret in its DuckDB instance. ``ObjectStore`` carries what the
settings say (endpoint, region, keys, path-style addressing, TLS) and ``install_secret`` turns it
into one temporary (in-memory, never persisted) DuckDB secret.

Invariants:
- the secret key and session token are ``SecretStr`` here and appear in no ``repr``, log line or
  error: a failed ``CREATE SECRET`` is re-raised with the parameters named, never their values;
- the DuckDB secret is ``TEMPORARY``: nothing writes the credentials to disk.
"""

import dataclasses

import duckdb
from pydantic import SecretStr

SECRET_NAME = "redox_lake_s3"  # noqa: S105 (the name of a DuckDB secret, not one)


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectStore:
    """How to reach the bucket: None fields fall back to DuckDB's defaults (AWS S3, HTTPS)."""

    region: str
    url_style: str
    use_ssl: bool
    endpoint: str | None = None
    key_id: str | None = None
    secret: SecretStr | None = dataclasses.field(default=None, repr=False)
    session_token: SecretStr | None = dataclasses.field(default=None, repr=False)

    def describe(self) -> str:
        """What may be logged: where, never the keys."""
        where = self.endpoint or "AWS S3"
        scheme = "https" if self.use_ssl else "http"
        return f"{scheme}://{where} region={self.region} url_style={self.url_style}"


def install_secret(con: duckdb.DuckDBPyConnection, store: ObjectStore) -> None:
    """Create (or replace) the temporary S3 secret the lake's ``s3://`` paths are read and written with."""
    params: list[tuple[str, object]] = [
        ("REGION", store.region),
        ("URL_STYLE", store.url_style),
        ("USE_SSL", store.use_ssl),
    ]
    if store.endpoint:
        params.append(("ENDPOINT", _bare_endpoint(store.endpoint)))
    if store.key_id:
        params.append(("KEY_ID", store.key_id))
    if store.secret is not None:
        params.append(("SECRET", store.secret.get_secret_value()))
    if store.session_token is not None:
        params.append(("SESSION_TOKEN", store.session_token.get_secret_value()))
    rendered = ", ".join(f"{name} {_literal(value)}" for name, value in params)
    failed: str | None = None
    try:
        con.execute(f"CREATE OR REPLACE TEMPORARY SECRET {SECRET_NAME} (TYPE s3, {rendered})")
    except duckdb.Error as exc:
        failed = type(exc).__name__
    if failed is not None:
        # The SQL holds the secret key, and DuckDB may echo it: say which parameters, not what.
        raise ValueError(
            f"DuckDB refused the S3 settings ({failed}) for {store.describe()}; check REDOX_S3_ENDPOINT, "
            "REDOX_S3_REGION, REDOX_S3_URL_STYLE and REDOX_S3_USE_SSL (docs/operations.md)"
        )


def _bare_endpoint(endpoint: str) -> str:
    # httpfs wants host[:port]; a scheme here (a common paste from a console) would be doubled.
    for scheme in ("https://", "http://"):
        if endpoint.lower().startswith(scheme):
            return endpoint[len(scheme) :].rstrip("/")
    return endpoint.rstrip("/")


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "'" + str(value).replace("'", "''") + "'"
