"""`redox-etl identity ...`: link two patient files outside the warehouse.

``link`` reads two Parquet files in the unified ``patients`` schema (any origin: a warehouse export,
an outside registry list), runs the same deterministic and probabilistic passes as the identity
asset, and writes every scored pair with its decision. Output on the terminal is counts only: the
files hold PHI, the terminal and its scrollback must not.
"""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import polars as pl
import typer
from rich.console import Console
from rich.table import Table

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


def _read(path: Path, side: str) -> pl.DataFrame:
    if not path.is_file():
        raise typer.BadParameter(f"{side} file not found: {path}")
    frame = pl.read_parquet(path)
    missing = {"source_surface", "source_id"} - set(frame.columns)
    if missing:
        raise typer.BadParameter(f"{side} file lacks required column(s): {', '.join(sorted(missing))}")
    return identity.conform_patients(frame).collect()


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
    lhs, rhs = _read(left, "left"), _read(right, "right")
    if lhs.height == 0 or rhs.height == 0:
        raise typer.BadParameter("both files need at least one patient")
    model = json.loads(model_path.read_text()) if model_path is not None else None
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
        console.print(f"[red]identity link failed:[/red] {message}")
        raise typer.Exit(1) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pairs.write_parquet(tmp)
    tmp.replace(out)
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
    console.print(f"wrote {pairs.height:,} pairs to {out}")
