"""`redox-etl identity ...`: link two patient files outside the warehouse.

``link`` reads two Parquet files in the unified ``patients`` schema (any origin: a warehouse export,
an outside registry list), runs the same deterministic and probabilistic passes as the identity
asset, and writes every scored pair with its decision. Output on the terminal is counts, and the
parts of the model left out for lack of data (column names and reasons): the files hold PHI, the
terminal and its scrollback must not.

``decide`` records a reviewer's decision on a pair (named by its review-queue ``pair_id``, by a
two-record ``person_key``, or by both records) in the lake's ``identity_decisions``; the next run of
the ``person_crosswalk`` asset honours it. It prints no record id either.
"""

import contextlib
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import polars as pl
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from resources import configured_warehouse
from resources.warehouse import Warehouse
from transforms import identity

app = typer.Typer(
    name="identity",
    help="Patient identity: link patient lists across sources.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals hold patient rows
)


@app.callback()
def _group() -> None:
    """Patient identity: link patient lists across sources."""


PAIRS_OUT = pl.Schema(
    {
        **identity.PAIRS,
        "decision": pl.String(),  # 'link' | 'review' | 'no-link'
        "reason": pl.String(),
    }
)


EXPECTED_INPUT = (
    "expected a Parquet file of patients in the unified schema (at least source_surface and "
    "source_id); docs/identity.md says how to make one"
)


class InputFileError(Exception):
    """An input file this command cannot use; the message is one line naming it and what to do."""


def _read(path: Path, side: str) -> pl.DataFrame:
    """The ``side`` (--left/--right) file as patients, or InputFileError naming the file and the fix.

    No polars message is passed on: a parse error may quote the file's bytes, i.e. patient data.
    """
    if not path.is_file():
        raise InputFileError(f"--{side} {path}: no such file; {EXPECTED_INPUT}")
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError, ValueError):
        raise InputFileError(f"--{side} {path}: not a readable Parquet file; {EXPECTED_INPUT}") from None
    missing = {"source_surface", "source_id"} - set(frame.columns)
    if missing:
        raise InputFileError(
            f"--{side} {path}: lacks the column(s) {', '.join(sorted(missing))}; {EXPECTED_INPUT}"
        )
    try:
        return identity.conform_patients(frame).collect()
    except pl.exceptions.PolarsError as err:
        raise InputFileError(
            f"--{side} {path}: a column has the wrong type ({type(err).__name__}); {EXPECTED_INPUT}"
        ) from None


def _read_model(path: Path) -> dict[str, object]:
    try:
        model = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise InputFileError(
            f"--model {path}: not a readable JSON model; pass a file written by --save-model"
        ) from None
    if not isinstance(model, dict):
        raise InputFileError(f"--model {path}: not a model; pass a file written by --save-model")
    return model


def _write_owner_only(out: Path, write: Callable[[Path], object]) -> None:
    """Write ``out`` through a 0600 staging file renamed into place: the pairs hold patient ids."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        write(tmp)
        tmp.chmod(0o600)
        tmp.replace(out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def link_files(
    left: pl.DataFrame,
    right: pl.DataFrame,
    *,
    model: dict[str, object] | None = None,
    link_threshold: float = identity.LINK_THRESHOLD,
    review_threshold: float = identity.REVIEW_THRESHOLD,
    seed: int = 0,
    now: datetime | None = None,
) -> tuple[pl.DataFrame, dict[str, object]]:
    """Score and decide every candidate pair between two patient frames; returns (pairs, model)."""
    at = now or datetime.now(UTC)
    lhs, rhs = left.lazy(), right.lazy()
    if model is None:
        model = identity.train_model(lhs, rhs, seed=seed)
    scored = identity.score_pairs(lhs, rhs, model)
    exact = identity.deterministic_links(lhs, rhs).collect()
    pairs = pl.concat([exact, scored])
    links, review = identity.decide(
        pairs, now=at, link_threshold=link_threshold, review_threshold=review_threshold
    )
    decided = pl.concat(
        [
            links.select("pair_id", "method", decision=pl.lit("link"), reason=pl.lit(None, pl.String())),
            review.select(
                "pair_id", method=pl.lit("probabilistic"), decision=pl.lit("review"), reason="reason"
            ),
        ]
    )
    # One row per pair: the decided method (an identifier link beats its own score).
    best = pairs.join(decided.select("pair_id", "method"), on=["pair_id", "method"], how="semi")
    rest = pairs.join(decided.select("pair_id"), on="pair_id", how="anti").filter(
        pl.col("method") == "probabilistic"
    )
    out = (
        pl.concat([best, rest])
        .unique("pair_id", keep="first", maintain_order=True)
        .join(decided.select("pair_id", "decision", "reason"), on="pair_id", how="left")
        .with_columns(decision=pl.col("decision").fill_null("no-link"))
        .sort("match_probability", "match_weight", descending=True, nulls_last=True)
        .select(PAIRS_OUT.names())
        .cast(PAIRS_OUT)
    )
    return out, model


@app.command()
def link(
    left: Annotated[Path, typer.Option("--left", help="Patients Parquet file (unified schema).")],
    right: Annotated[Path, typer.Option("--right", help="Patients Parquet file (unified schema).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the scored pairs (Parquet).")],
    model_path: Annotated[
        Path | None, typer.Option("--model", help="Use this trained model (JSON) instead of training.")
    ] = None,
    save_model: Annotated[
        Path | None, typer.Option("--save-model", help="Write the model used to this JSON file.")
    ] = None,
    link_threshold: Annotated[
        float, typer.Option(help="Match probability at or above which a pair links.")
    ] = identity.LINK_THRESHOLD,
    review_threshold: Annotated[
        float, typer.Option(help="Match probability at or above which a pair goes to review.")
    ] = identity.REVIEW_THRESHOLD,
    seed: Annotated[int, typer.Option(help="Seed for the model's random sampling.")] = 0,
) -> None:
    """Link two patient files and write every scored pair with its decision (link/review/no-link)."""
    console = Console(stderr=True)
    try:
        lhs, rhs = _read(left, "left"), _read(right, "right")
        model = _read_model(model_path) if model_path is not None else None
    except InputFileError as err:
        console.print(Text.assemble(("identity link:", "red"), f" {err}"), soft_wrap=True)
        raise typer.Exit(2) from None
    if lhs.height == 0 or rhs.height == 0:
        raise typer.BadParameter("both files need at least one patient")
    try:
        pairs, used = link_files(
            lhs,
            rhs,
            model=model,
            link_threshold=link_threshold,
            review_threshold=review_threshold,
            seed=seed,
        )
    except (ValueError, identity.IdentityError) as err:
        # Our errors carry no patient values; a library's ValueError subclass might, so only its type.
        message = str(err) if type(err) in (ValueError, identity.IdentityError) else type(err).__name__
        console.print(f"[red]identity link failed:[/red] {escape(message)}", highlight=False)
        if model_path is None and type(err) is identity.IdentityError:
            console.print(
                "A model trained on fuller lists (e.g. the lake's identity_model) scores with --model."
            )
        raise typer.Exit(1) from None
    _write_owner_only(out, pairs.write_parquet)
    if save_model is not None:
        save_model.write_text(json.dumps(used, indent=2))
    counts = dict(pairs.group_by("decision").len().iter_rows())
    table = Table(title="identity link")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("left records", f"{lhs.height:,}")
    table.add_row("right records", f"{rhs.height:,}")
    for decision in ("link", "review", "no-link"):
        table.add_row(f"pairs: {decision}", f"{counts.get(decision, 0):,}")
    console.print(table)
    _print_left_out(console, used)
    console.print(f"wrote {pairs.height:,} pairs to {out}")


def _print_left_out(console: Console, model: dict[str, object]) -> None:
    """The parts of the model its training data could not feed: names and reasons, no values."""
    left_out = model.get("left_out")
    if not isinstance(left_out, list) or not left_out:
        return
    table = Table(title="left out of the model (no usable data on one side or both)")
    table.add_column("part")
    table.add_column("name")
    table.add_column("why")
    for part in left_out:
        table.add_row(*(escape(str(part[k])) for k in ("part", "name", "reason")))
    console.print(table)


def _record(text: str, side: str) -> tuple[str, str]:
    surface, sep, source_id = text.partition(":")
    if not sep or surface not in ("fhir", "datamodel") or not source_id:
        raise typer.BadParameter(f"--{side} must be SURFACE:SOURCE_ID with SURFACE fhir or datamodel")
    return surface, source_id


def decision_pair(
    warehouse: Warehouse,
    *,
    pair: str | None = None,
    person: str | None = None,
    left: str | None = None,
    right: str | None = None,
) -> tuple[str, str, str, str]:
    """The (left_surface, left_id, right_surface, right_id) a decision is about, named one of three
    ways: a review-queue ``pair_id``, a ``person_key`` holding exactly two records, or both records."""
    named = [pair is not None, person is not None, left is not None or right is not None]
    if sum(named) != 1 or (named[2] and (left is None or right is None)):
        raise typer.BadParameter("name the pair one way: --pair, --person, or both --left and --right")
    if left is not None and right is not None:
        return (*_record(left, "left"), *_record(right, "right"))
    if pair is not None:
        rows = warehouse.query(
            "SELECT left_surface, left_id, right_surface, right_id FROM identity_review WHERE pair_id = ?",
            [pair],
        )
        if rows.height != 1:
            raise typer.BadParameter("no such pair_id in identity_review (it may have been decided already)")
        ls, li, rs, ri = rows.row(0)
        return ls, li, rs, ri
    rows = warehouse.query(
        "SELECT source_surface, source_id FROM person_crosswalk WHERE person_key = ? ORDER BY source_surface DESC",
        [person],
    )
    if rows.height != 2:
        raise typer.BadParameter(
            f"that person_key holds {rows.height} record(s); --person needs exactly two, else use --left/--right"
        )
    (ls, li), (rs, ri) = rows.rows()
    return ls, li, rs, ri


@app.command()
def decide(
    decision: Annotated[str, typer.Argument(help="link | no-link")],
    by: Annotated[str, typer.Option("--by", help="Who decides (kept with the decision).")],
    pair: Annotated[str | None, typer.Option("--pair", help="A pair_id from identity_review.")] = None,
    person: Annotated[
        str | None, typer.Option("--person", help="A person_key of two records: decide about those two.")
    ] = None,
    left: Annotated[str | None, typer.Option("--left", help="SURFACE:SOURCE_ID of one record.")] = None,
    right: Annotated[
        str | None, typer.Option("--right", help="SURFACE:SOURCE_ID of the other record.")
    ] = None,
    note: Annotated[str | None, typer.Option("--note", help="Why (no patient values, please).")] = None,
) -> None:
    """Record a reviewer's decision on a pair in identity_decisions; the next identity run honours it."""
    if decision not in ("link", "no-link"):
        raise typer.BadParameter("decision must be 'link' or 'no-link'")
    warehouse = configured_warehouse()
    ls, li, rs, ri = decision_pair(warehouse, pair=pair, person=person, left=left, right=right)
    row = pl.DataFrame(
        [
            {
                "left_surface": ls,
                "left_id": li,
                "right_surface": rs,
                "right_id": ri,
                "decision": decision,
                "decided_by": by,
                "decided_at": datetime.now(UTC),
                "note": note,
            }
        ],
        schema=identity.IDENTITY_DECISIONS,
    )
    warehouse.write_derived(
        run_id=f"identity-decide-{datetime.now(UTC):%Y%m%dT%H%M%S}",
        message="identity decision",
        append={"identity_decisions": row},
    )
    # The record ids stay off the terminal: a Data Model id can be an MRN.
    Console(stderr=True).print(
        f"recorded '{decision}' in identity_decisions; the next person_crosswalk run applies it "
        "(e.g. `redox-etl sync` or materialize person_crosswalk)"
    )
