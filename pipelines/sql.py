"""`redox-etl sql`: read-only SQL against the lake, printed as a table or written as CSV/JSON/Parquet.

Without a query it opens a small interactive shell (statements end with ``;``; ``.tables``,
``.schema TABLE``, ``.help``, ``.quit``). The session has the lake attached as ``lake`` (and ``USE
lake``), in UTC, so ``SELECT count(*) FROM patients`` just works, and time travel reads
``FROM results AT (VERSION => 42)``.

Invariants:
- this command never changes the lake. The lake is attached READ_ONLY, and statements that would
  write, attach or load anything are refused before they run, with a message that says so; the
  read-only attach stays the backstop for whatever slips past that check;
- the session reads the lake and no other file: DuckDB's external access is off and locked
  (``Warehouse.connect_contained``), so ``read_csv('/etc/passwd')`` or a credentials file beside
  the lake is refused, in one line;
- data is printed literally: values and column names are never read as Rich markup or emoji codes;
- files it writes (``--out``) are owner-only (0600): they hold patient data.
"""

import contextlib
import enum
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, BinaryIO

import duckdb
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from resources import configured_warehouse
from resources.warehouse import LAKE, LakeNotFoundError

# Everything an analyst needs to read; anything else (DML, DDL, ATTACH, LOAD, COPY, EXPORT, ...) is
# refused. CALL stays allowed for the snapshot and metadata functions; the read-only attach refuses
# the ones that would write.
_READ_STATEMENTS = frozenset(
    {
        duckdb.StatementType.SELECT,
        duckdb.StatementType.EXPLAIN,
        duckdb.StatementType.PRAGMA,
        duckdb.StatementType.SET,
        duckdb.StatementType.VARIABLE_SET,
        duckdb.StatementType.CALL,
        duckdb.StatementType.TRANSACTION,
        duckdb.StatementType.PREPARE,
        duckdb.StatementType.EXECUTE,
    }
)

READ_ONLY_HINT = (
    "redox-etl sql is read-only: the lake is attached READ_ONLY and data changes go through the "
    "pipeline (redox-etl sync). To export results use --format csv|json|parquet --out FILE."
)

CONTAINED_HINT = (
    "redox-etl sql reads only the lake: files, URLs and extensions outside it cannot be read or "
    "written. To export results use --format csv|json|parquet --out FILE."
)
_NO_FILE_ACCESS = re.compile(r'Cannot access file "(?P<path>[^"]*)"|disabled (through|by) configuration')

SHELL_HELP = """\
Statements end with ';' and may span lines. The lake is attached as `lake` and is the default.
  .tables             list the lake's tables and views, with what each holds
  .schema TABLE       columns, types and meanings of TABLE (or a view)
  .snapshots          the lake's snapshots (for ... AT (VERSION => n))
  .help               this text
  .quit / .exit       leave (Ctrl-D works too)"""


class OutputFormat(enum.StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


class RefusedStatementError(Exception):
    """A statement this read-only session will not run."""


app = typer.Typer(
    name="sql",
    help="Read-only SQL against the lake.",
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold query results, i.e. patient data
)


@app.command()
def sql(
    query: Annotated[
        str | None,
        typer.Argument(help="SQL to run (several statements separated by ';'). Omit for a shell."),
    ] = None,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="How to print or write the result.")
    ] = OutputFormat.table,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the result to this file (needed for parquet).")
    ] = None,
    lake: Annotated[
        Path | None,
        typer.Option("--lake", help="Lake folder. Default: REDOX_ETL_LAKE or $REDOX_ETL_HOME/lake."),
    ] = None,
    max_rows: Annotated[
        int, typer.Option("--max-rows", min=1, help="Rows shown in table format (files get all rows).")
    ] = 200,
) -> None:
    """Run read-only SQL against the lake; without QUERY, open an interactive shell."""
    # No emoji codes and no highlighting anywhere: data must print as it is stored.
    console = Console(emoji=False, highlight=False)
    errors = Console(stderr=True, emoji=False, highlight=False)
    if fmt is OutputFormat.parquet and out is None:
        raise typer.BadParameter("--format parquet needs --out FILE", param_hint="--out")
    warehouse = configured_warehouse(lake_dir=str(lake) if lake else None)
    try:
        con = warehouse.connect_contained()
    except LakeNotFoundError as exc:
        _say(errors, "error:", str(exc))
        raise typer.Exit(1) from None
    with contextlib.closing(con):
        if query is None:
            shell(con, console, errors, location=warehouse.describe())
            return
        try:
            run(con, query, fmt=fmt, out=out, max_rows=max_rows, console=console)
        except RefusedStatementError as exc:
            _say(errors, "refused:", str(exc))
            raise typer.Exit(1) from None
        except duckdb.Error as exc:
            _say(errors, *_explain(exc))
            raise typer.Exit(1) from None


def run(
    con: duckdb.DuckDBPyConnection,
    query: str,
    *,
    fmt: OutputFormat = OutputFormat.table,
    out: Path | None = None,
    max_rows: int = 200,
    console: Console | None = None,
) -> None:
    """Check every statement of ``query``, then run them in order; results go to ``console``/``out``.

    In table format every statement's result is printed; in file formats the last one is written.
    """
    console = console or Console(emoji=False, highlight=False)
    statements = duckdb.extract_statements(query)
    if not statements:
        raise RefusedStatementError("no SQL statement found")
    for statement in statements:
        if statement.type not in _READ_STATEMENTS:
            raise RefusedStatementError(f"{statement.type.name} statements are not allowed. {READ_ONLY_HINT}")
    for index, statement in enumerate(statements):
        last = index == len(statements) - 1
        relation = con.sql(statement.query)
        if relation is None:
            if fmt is OutputFormat.table:
                console.print(Text("OK", style="dim"))
            continue
        if fmt is OutputFormat.table:
            _print_table(relation, console, max_rows)
        elif last:
            _write(relation, fmt, out, console)


def shell(con: duckdb.DuckDBPyConnection, console: Console, errors: Console, *, location: str) -> None:
    """A small REPL: read statements until ';', run them read-only, keep going after errors."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history in input(), where available)
    interactive = sys.stdin.isatty()
    if interactive:
        console.print(Text.assemble(("redox-etl sql", "bold"), f" read-only session ({location})"))
        console.print("End statements with ';'. Type .help for commands, .quit to leave.")
    buffer: list[str] = []
    while True:
        try:
            line = input(("lake> " if not buffer else "  ...> ") if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            buffer = []
            console.print()
            continue
        stripped = line.strip()
        if not buffer and stripped.startswith("."):
            if not _dot_command(con, stripped, console, errors):
                break
            continue
        if not stripped and not buffer:
            continue
        buffer.append(line)
        text = "\n".join(buffer).strip()
        if not text.endswith(";"):
            continue
        buffer = []
        try:
            run(con, text, console=console)
        except RefusedStatementError as exc:
            _say(errors, "refused:", str(exc))
        except duckdb.Error as exc:
            _say(errors, *_explain(exc))
    if buffer:
        errors.print("[yellow]unfinished statement ignored (no ';')[/yellow]")


def _dot_command(con: duckdb.DuckDBPyConnection, command: str, console: Console, errors: Console) -> bool:
    """Run a shell dot-command; False means leave the shell."""
    name, _, arg = command.partition(" ")
    arg = arg.strip().rstrip(";")
    try:
        if name in (".quit", ".exit", ".q"):
            return False
        if name == ".help":
            console.print(SHELL_HELP, markup=False, highlight=False)
        elif name == ".tables":
            _print_table(
                con.sql(
                    "SELECT table_name AS name, 'table' AS kind, comment FROM duckdb_tables() "
                    f"WHERE database_name = '{LAKE}' "
                    "UNION ALL SELECT view_name, 'view', comment FROM duckdb_views() "
                    f"WHERE database_name = '{LAKE}' AND NOT internal ORDER BY name"
                ),
                console,
                1000,
            )
        elif name == ".schema" and arg:
            _print_table(
                con.sql(
                    "SELECT column_name, data_type, comment FROM duckdb_columns() "
                    f"WHERE database_name = '{LAKE}' AND table_name = $name ORDER BY column_index",
                    params={"name": arg},
                ),
                console,
                1000,
            )
        elif name == ".snapshots":
            _print_table(
                con.sql(f"SELECT * FROM ducklake_snapshots('{LAKE}') ORDER BY snapshot_id"), console, 1000
            )
        else:
            _say(errors, "unknown command", f"{name!r}; .help lists them")
    except duckdb.Error as exc:
        _say(errors, *_explain(exc))
    return True


def _say(console: Console, label: str, message: str) -> None:
    """``label`` in red, then ``message`` exactly as given (it may quote data: no markup)."""
    # soft_wrap: the terminal wraps a long line; rich would break it into several at 80 columns.
    console.print(Text.assemble((label, "red"), " ", message), soft_wrap=True)


def _print_table(relation: duckdb.DuckDBPyRelation, console: Console, max_rows: int) -> None:
    rows = relation.limit(max_rows + 1).fetchall()
    # Text cells and headers: a value like "Dr. [i]X [/] :x:" is data, not markup or an emoji code.
    # Folded, never cut with an ellipsis, so what is shown is all there is.
    table = Table(header_style="bold", show_lines=False)
    for column in relation.columns:
        table.add_column(Text(column), overflow="fold")
    for row in rows[:max_rows]:
        table.add_row(*(Text(_cell(value)) for value in row))
    console.print(table)
    shown = min(len(rows), max_rows)
    if len(rows) > max_rows:
        console.print(
            f"[dim]first {max_rows} rows shown; more exist (use --max-rows, or --format csv --out FILE)[/dim]"
        )
    else:
        console.print(f"[dim]{shown} row{'s' if shown != 1 else ''}[/dim]")


def _cell(value: object) -> str:
    return "NULL" if value is None else str(value)


def _write(relation: duckdb.DuckDBPyRelation, fmt: OutputFormat, out: Path | None, console: Console) -> None:
    # The file is written here, by Python, not by DuckDB: the session itself may write no file.
    if fmt is OutputFormat.parquet:
        assert out is not None
        frame = relation.pl()
        _write_owner_only(out, lambda handle: frame.write_parquet(handle, compression="zstd"))
    else:
        flat = fmt is OutputFormat.csv  # CSV cells cannot hold lists or structs
        text = _flat(relation).pl().write_csv() if flat else relation.pl().write_json()
        if out is None:
            # Straight to stdout: rich would wrap long lines and mark up brackets in the data.
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            sys.stdout.flush()
            return
        _write_owner_only(out, lambda handle: handle.write(text.encode()))
    Console(stderr=True).print(Text(f"wrote {out}", style="dim"))


def _write_owner_only(out: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``out`` as a new 0600 file, atomically: a staging file in the same folder, then rename.

    Replacing rather than rewriting also resets the mode of a file that was there before.
    """
    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        staging.unlink()
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        staging.replace(out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        raise


def _flat(relation: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """Nested columns (lists, structs, maps) as JSON text, which CSV can hold and tools can parse."""
    nested = ("STRUCT", "MAP", "UNION", "[]")
    columns = []
    for name, dtype in zip(relation.columns, relation.dtypes, strict=True):
        ident = '"' + name.replace('"', '""') + '"'
        if any(marker in str(dtype).upper() for marker in nested):
            columns.append(f"CAST(to_json({ident}) AS VARCHAR) AS {ident}")
        else:
            columns.append(ident)
    return relation.project(", ".join(columns))


def _explain(exc: duckdb.Error) -> tuple[str, str]:
    """The label and message to show for a DuckDB error, in DuckDB's own words plus what to do."""
    message = str(exc)
    if isinstance(exc, duckdb.PermissionException) or _NO_FILE_ACCESS.search(message):
        found = _NO_FILE_ACCESS.search(message)
        what = f"{found['path']} is outside the lake. " if found and found["path"] else ""
        return "refused:", f"{what}{CONTAINED_HINT}"
    if "read-only" in message.lower() or "read only" in message.lower():
        return "error:", f"{message}\n{READ_ONLY_HINT}"
    return "error:", message


if __name__ == "__main__":
    app()
