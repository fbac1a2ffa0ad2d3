"""The probabilistic pass: train a Fellegi-Sunter model without labels and score candidate pairs.

Splink runs on a private in-memory DuckDB connection per call and nothing else is opened. It is
imported where it is used: its import takes most of a second, and most processes that load this
package (the Dagster code location, the other CLI commands) never train or score.

Invariants:
- a model is plain JSON (``MODEL_FORMAT``) and the same input and seed train the same model, so a
  stored model scores, and so links, the same on every rerun;
- a model holds only the comparisons, blocking rules and EM sessions its two inputs could feed
  (``usable.plan``), and lists the others under ``left_out`` with the reason;
- no level can decide a pair alone (parameter floors in ``_regularize``);
- no patient value reaches a log or an exception: Splink's logging is held at ERROR while it runs,
  Splink's own reasons (about rules and settings) are passed on, and an error of the engine below
  it (whose text can quote a value) becomes an ``IdentityError`` naming only its kind.
"""

import contextlib
import dataclasses
import logging
import re
from collections.abc import Iterator
from typing import Any, Final

import duckdb
import polars as pl

from schema import NATURAL_KEY
from transforms.identity.comparisons import settings
from transforms.identity.errors import IdentityError
from transforms.identity.features import FEATURE_COLUMNS, features
from transforms.identity.records import latest_versions
from transforms.identity.tables import PAIRS, pair_id
from transforms.identity.usable import SideStats, plan, side_stats

__all__ = ["MIN_MATCH_WEIGHT", "MODEL_FORMAT", "IdentityError", "score_pairs", "train_model"]

MODEL_FORMAT: Final = "redox-etl-identity/1"

# Parameter floors applied after training (see _regularize).
_M_FLOOR: Final = 0.002
_U_FLOOR: Final = 1e-5
# Pairs scoring below this weight are not worth keeping as evidence (probability ~ 3e-5).
MIN_MATCH_WEIGHT: Final = -15.0


@contextlib.contextmanager
def _quiet_splink() -> Iterator[None]:
    # Splink logs parameter estimates and SQL at INFO; none of it is PHI, but a pipeline's log is
    # no place for it, and a future Splink could log sample rows.
    logger = logging.getLogger("splink")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


_ANSI: Final = re.compile(r"\x1b\[[0-9;]*m")


def _engine_error(err: Exception) -> IdentityError:
    """The ``IdentityError`` for a failure in Splink or DuckDB, keeping what is safe to show.

    Splink wraps a failed SQL statement in a ``SplinkException`` whose text holds the SQL and
    DuckDB's message, and DuckDB quotes offending values in some messages (a failed cast shows the
    value): only the kind of the engine's error is kept. A Splink exception of its own making
    (``EMTrainingException``: a training rule found no pairs; a settings error) is about rules and
    settings, never records, and its first paragraph is the reason the user needs.
    """
    cause = err.__cause__
    if isinstance(err, duckdb.Error) or cause is not None:
        kind = type(cause if cause is not None else err).__name__
        return IdentityError(f"identity matching failed in DuckDB ({kind})")
    reason = " ".join(_ANSI.sub("", str(err)).strip().split("\n\n")[0].split())
    return IdentityError(f"identity matching failed in Splink ({type(err).__name__}): {reason[:600]}")


@dataclasses.dataclass
class _Session:
    con: duckdb.DuckDBPyConnection
    left: Any
    right: Any
    left_keys: pl.DataFrame
    right_keys: pl.DataFrame
    left_features: pl.DataFrame
    right_features: pl.DataFrame
    left_stats: SideStats
    right_stats: SideStats


@contextlib.contextmanager
def _session(
    left: pl.DataFrame | pl.LazyFrame,
    right: pl.DataFrame | pl.LazyFrame,
    *,
    threads: int | None,
    memory_limit: str | None,
) -> Iterator[_Session]:
    from splink import DuckDBAPI
    from splink.internals.exceptions import SplinkException  # Splink's wrapper: SQL + DuckDB message

    left_records = latest_versions(left.lazy()).collect()
    right_records = latest_versions(right.lazy()).collect()
    # Sorted so that row ids, and with them Splink's hash-based samples, repeat between runs.
    lhs = features(left_records.lazy()).sort(NATURAL_KEY).collect()
    rhs = features(right_records.lazy()).sort(NATURAL_KEY).collect()
    stats = side_stats(left_records, lhs), side_stats(right_records, rhs)
    del left_records, right_records
    # Splink joins on a small integer id; the natural key goes back on afterwards.
    lhs = lhs.with_row_index("rid").with_columns(pl.col("rid").cast(pl.Int64))
    rhs = rhs.with_row_index("rid").with_columns(pl.col("rid").cast(pl.Int64) + lhs.height)
    config: dict[str, Any] = {}
    if threads:
        config["threads"] = threads
    if memory_limit:
        config["memory_limit"] = memory_limit
    con = duckdb.connect(":memory:", config=config)
    try:
        # The progress bar writes to stdout: noise in logs and CLI output.
        con.execute("SET enable_progress_bar = false")
        db = DuckDBAPI(con)
        cols = ["rid", *FEATURE_COLUMNS]
        left_sdf = db.register(lhs.select(cols).to_arrow(), dataset_display_name="lhs")
        right_sdf = db.register(rhs.select(cols).to_arrow(), dataset_display_name="rhs")
        yield _Session(
            con=con,
            left=left_sdf,
            right=right_sdf,
            left_keys=lhs.select("rid", "source_surface", "source_id"),
            right_keys=rhs.select("rid", "source_surface", "source_id"),
            left_features=lhs,
            right_features=rhs,
            left_stats=stats[0],
            right_stats=stats[1],
        )
    except (duckdb.Error, SplinkException) as err:
        # Raised without the chain: the original's text (and its cause's) can quote patient data.
        raise _engine_error(err) from None
    finally:
        con.close()


def train_model(
    left: pl.DataFrame | pl.LazyFrame,
    right: pl.DataFrame | pl.LazyFrame,
    *,
    seed: int = 0,
    max_u_pairs: float = 2e6,
    max_em_pairs: float = 2e6,
    threads: int | None = None,
    memory_limit: str | None = None,
) -> dict[str, Any]:
    """Train the Fellegi-Sunter model without labels; returns a JSON-serializable model.

    u probabilities come from random pairs (almost all non-matches), m probabilities from EM over
    blocked pairs, and the prior probability of a match from the EM sessions. Deterministic given
    ``seed`` and the input. Comparisons, blocking rules and EM sessions the inputs cannot feed are
    left out and listed in the model's ``left_out`` (part, name, columns, reason); too few usable
    columns raise ``IdentityError`` naming them.
    """
    from splink import Linker

    with _quiet_splink(), _session(left, right, threads=threads, memory_limit=memory_limit) as s:
        n_left, n_right = s.left_keys.height, s.right_keys.height
        if n_left == 0 or n_right == 0:
            raise ValueError("train_model needs records on both sides")
        usable = plan(s.left_stats, s.right_stats, s.left_features, s.right_features)
        # Prior: at most one match per record of the smaller side; EM refines it below.
        prior = min(n_left, n_right) / (n_left * n_right) * 0.5
        untrained = settings(
            probability_two_random_records_match=prior,
            comparisons=usable.comparisons,
            blocking_rules=usable.blocking_rules,
        )
        linker = Linker([s.left, s.right], untrained, log_level=None)
        # No early stop and one chunk: Splink's early stop depends on chunk order, and a model
        # that changes between identical runs would move links between runs.
        linker.training.estimate_u_using_random_sampling(
            max_pairs=min(max_u_pairs, float(n_left * n_right)),
            seed=seed,
            min_count_per_level=None,
            num_chunks=1,
        )
        for rule in usable.em_rules:
            linker.training.estimate_parameters_using_expectation_maximisation(
                rule,
                estimate_without_term_frequencies=True,
                max_pairs=max_em_pairs,
            )
        trained = linker.misc.save_model_to_json()
    trained.pop("linker_uid", None)
    _discount_matches(trained, prior)
    _regularize(trained)
    trained["probability_two_random_records_match"] = prior
    return {"format": MODEL_FORMAT, "splink": trained, "left_out": list(usable.left_out)}


def _discount_matches(splink_settings: dict[str, Any], match_share: float) -> None:
    """Take the true matches out of the u probabilities estimated from random pairs.

    Random sampling treats every sampled pair as a non-match. In a list of a few thousand records
    the matches among them (``match_share`` of all pairs, the prior) are most of the pairs that
    agree on a birth date, an SSN or an address, so u comes out many times too large and each of
    those agreements counts ~10 bits where it is worth ~14. Without phone, email or SSN the
    remaining fields then cannot reach the link threshold. With u = share x m + (1 - share) x u',
    the non-match u' is recovered; the prior undercounts matches, so this errs on the side of too
    little. At a million records the share is ~1e-6 and nothing changes.
    """
    for comparison in splink_settings["comparisons"]:
        for lv in comparison["comparison_levels"]:
            if lv.get("is_null_level") or lv.get("u_probability") is None:
                continue
            m, u = float(lv.get("m_probability") or 0.0), float(lv["u_probability"])
            lv["u_probability"] = max(u - match_share * m, 0.0) / (1.0 - match_share)


def _regularize(splink_settings: dict[str, Any]) -> None:
    """Bound every level's parameters so that no single field can decide a pair on its own.

    EM on clean data can drive the m probability of a disagreement level to ~0 (a -70 bit weight
    for a differing birth date), which would make one data-entry error veto a true match; random
    sampling can leave a rare agreement level with a u of a few random pairs, or none. The floors
    cap any level's influence at roughly +/-13 bits.
    """
    for comparison in splink_settings["comparisons"]:
        levels = [lv for lv in comparison["comparison_levels"] if not lv.get("is_null_level")]
        for lv in levels:
            lv["m_probability"] = max(float(lv.get("m_probability") or _M_FLOOR), _M_FLOOR)
            lv["u_probability"] = max(float(lv.get("u_probability") or _U_FLOOR), _U_FLOOR)
        for key in ("m_probability", "u_probability"):
            total = sum(lv[key] for lv in levels)
            for lv in levels:
                # Rounded: parallel sums in DuckDB differ in the last bits from run to run, and a
                # model should serialize the same way for the same input.
                lv[key] = float(f"{lv[key] / total:.10g}")


def _check_model(model: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(model, dict) or model.get("format") != MODEL_FORMAT or "splink" not in model:
        raise ValueError(f"not an identity model of format {MODEL_FORMAT}; retrain with train_model")
    return dict(model["splink"])


def _level_labels(splink_settings: dict[str, Any]) -> dict[str, dict[int, str]]:
    """gamma value -> level label per comparison, following Splink's numbering (highest non-null
    level first, counting down to 0; null is -1)."""
    out: dict[str, dict[int, str]] = {}
    for comparison in splink_settings["comparisons"]:
        levels = comparison["comparison_levels"]
        non_null = [lv for lv in levels if not lv.get("is_null_level")]
        labels = {len(non_null) - 1 - i: lv["label_for_charts"] for i, lv in enumerate(non_null)}
        labels[-1] = "missing"
        out[comparison["output_column_name"]] = labels
    return out


# Levels that tie a pair to one person beyond name, birth date and sex. A pair with none of them is
# never linked automatically (flag 'uncorroborated').
_CORROBORATING: Final[dict[str, tuple[str, ...]]] = {
    "ssn": ("exact", "one edit"),
    "phone": ("exact", "one edit"),
    "email": ("exact", "same mailbox"),
    "address": ("same address", "close address", "same postal code"),
    "middle_name": ("exact",),
}
# The same 3-digit ZIP area corroborates a pair only when nothing personal disagrees: a move within
# town is the commonest way an address changes (and, in a list without SSNs, phones or emails, the
# only trace left of a person who moved), but a same-name, same-birth-date stranger in the same
# area is not rare, and shows itself by a differing middle name, SSN, phone, email or sex.
_AREA_VETOED_BY: Final = ("middle_name", "ssn", "phone", "email", "sex")
# What a person lacks in one system they mostly lack in the other (no SSN: a child, a foreign
# national; no middle name), while two strangers lack these things independently. So two records
# that both lack the SSN *and* the middle name corroborate a name and birth date, like a move within
# town, when nothing personal disagrees, but only where both lists hold these columns for most
# records (more than half of each list): where a list seldom records them, absence says nothing.
_SHARED_ABSENCE: Final = ("ssn", "middle")
_MOSTLY_RECORDED: Final = 0.5


def score_pairs(
    left: pl.DataFrame | pl.LazyFrame,
    right: pl.DataFrame | pl.LazyFrame,
    model: dict[str, Any],
    *,
    min_match_weight: float = MIN_MATCH_WEIGHT,
    threads: int | None = None,
    memory_limit: str | None = None,
) -> pl.DataFrame:
    """Score candidate pairs (left record, right record) from the blocking rules with ``model``.

    Returns ``PAIRS`` rows (method 'probabilistic') at or above ``min_match_weight``; ``evidence``
    holds each comparison's level and match weight (term-frequency adjustment included) and
    ``flags`` the conflict rules the pair trips ('uncorroborated', 'dob-differs', 'ssn-differs',
    'possible-relative'); a flagged pair is never linked automatically.
    """
    from splink import Linker

    splink_settings = _check_model(model)
    labels = _level_labels(splink_settings)
    names = list(labels)
    with _quiet_splink(), _session(left, right, threads=threads, memory_limit=memory_limit) as s:
        linker = Linker([s.left, s.right], splink_settings, log_level=None, validate_settings=False)
        predictions = linker.inference.predict(threshold_match_weight=min_match_weight, warning_mode="never")
        mw_cols = []
        for name in names:
            tf = f"mw_tf_adj_{name}"
            has_tf = any(lv.get("tf_adjustment_column") for lv in _comparison(splink_settings, name))
            mw_cols.append(f"mw_{name}" + (f" + {tf}" if has_tf else "") + f" AS mw_{name}")
        sql = (
            f"SELECT rid_l, rid_r, source_dataset_l, match_weight, "
            f"match_probability, {', '.join(f'gamma_{n}' for n in names)}, {', '.join(mw_cols)} "
            f"FROM {predictions.physical_name}"
        )
        raw = pl.from_arrow(s.con.sql(sql).to_arrow_table())
        assert isinstance(raw, pl.DataFrame)
        left_keys = s.left_keys.join(_absences(s.left_features, s.left_stats, "_l"), on="rid")
        right_keys = s.right_keys.join(_absences(s.right_features, s.right_stats, "_r"), on="rid")
    # Splink orders each pair by its own rules; put the left input's record on the left.
    swapped = pl.col("source_dataset_l") != "lhs"
    raw = raw.with_columns(
        rid_a=pl.when(swapped).then("rid_r").otherwise("rid_l"),
        rid_b=pl.when(swapped).then("rid_l").otherwise("rid_r"),
    )
    pairs = raw.join(
        left_keys.rename({"rid": "rid_a", "source_surface": "left_surface", "source_id": "left_id"}),
        on="rid_a",
    ).join(
        right_keys.rename({"rid": "rid_b", "source_surface": "right_surface", "source_id": "right_id"}),
        on="rid_b",
    )
    evidence = pl.concat_list(
        [
            pl.struct(
                comparison=pl.lit(name),
                level=pl.col(f"gamma_{name}").replace_strict(labels[name], return_dtype=pl.String()),
                match_weight=pl.col(f"mw_{name}").cast(pl.Float64),
            )
            for name in names
        ]
    )
    levels_of = {
        name: pl.col(f"gamma_{name}").replace_strict(labels[name], return_dtype=pl.String()) for name in names
    }

    def level(name: str) -> pl.Expr:
        # A comparison the model left out (no data on one side when it was trained) is missing.
        return levels_of.get(name, pl.lit("missing", pl.String()))

    same_area = (level("address") == "same area") & ~pl.any_horizontal(
        [pl.lit(False), *(level(name) == "different" for name in _AREA_VETOED_BY)]
    )
    shared_absence = pl.all_horizontal(
        [pl.col(f"_absent{side}") for side in ("_l", "_r")]
        + [level(name) != "different" for name in _AREA_VETOED_BY]
    )
    corroborated = pl.any_horizontal(
        [
            same_area,
            shared_absence,
            *(level(name).is_in(lv) for name, lv in _CORROBORATING.items() if name in levels_of),
        ]
    )
    flags = pl.concat_list(
        [
            pl.when(level("ssn") == "different")
            .then(pl.lit(["ssn-differs"]))
            .otherwise(pl.lit([], pl.List(pl.String()))),
            # Name and birth date alone are what strangers share too (two Maria Garcias born the same
            # day): without one agreeing contact or identifier a person has to look.
            pl.when(~corroborated)
            .then(pl.lit(["uncorroborated"]))
            .otherwise(pl.lit([], pl.List(pl.String()))),
            # A birth date that is not even a slip away: a parent and child who share name and
            # address (Jr/Sr) look alike on everything else.
            pl.when(level("birth_date") == "different")
            .then(pl.lit(["dob-differs"]))
            .otherwise(pl.lit([], pl.List(pl.String()))),
            # Twins and same-family relatives agree on family, birth date and address but differ
            # in given name; only an identical SSN outweighs that.
            pl.when(
                (
                    (
                        level("given_name").is_in(["different", "initial or prefix"])
                        # Two personal facts that a sibling does not share (a household shares an
                        # address and a phone, not a middle name and an email) outweigh a given
                        # name recorded differently, as an identical SSN does.
                        & ~((level("middle_name") == "exact") & (level("email") == "exact"))
                    )
                    # A slip away from a nickname is too loose to tell siblings apart (Anna and
                    # Ann) unless something personal, not household-wide, agrees as well.
                    | (
                        (level("given_name") == "nickname with a slip")
                        & (level("middle_name") != "exact")
                        & (level("email") != "exact")
                    )
                )
                & (level("ssn") != "exact")
                & level("family_name").is_in(["exact", "shared token", "typo"])
                & level("birth_date").is_in(["exact", "day-month swapped"])
            )
            .then(pl.lit(["possible-relative"]))
            .otherwise(pl.lit([], pl.List(pl.String()))),
        ]
    )
    return (
        pairs.with_columns(
            method=pl.lit("probabilistic"),
            evidence=evidence,
            flags=flags,
        )
        .with_columns(pair_id=pair_id())
        .select(PAIRS.names())
        .cast(PAIRS)
    )


def _absences(feature_frame: pl.DataFrame, stats: SideStats, suffix: str) -> pl.DataFrame:
    """``rid`` and ``_absent<suffix>``: the record lacks every ``_SHARED_ABSENCE`` feature that its
    list records for most of its records (false when the list seldom records one of them)."""
    recorded = all(stats.usable.get(f, 0) > _MOSTLY_RECORDED * stats.rows for f in _SHARED_ABSENCE)
    absent = pl.all_horizontal([pl.col(f).is_null() for f in _SHARED_ABSENCE]) & pl.lit(recorded)
    return feature_frame.select("rid", absent.alias(f"_absent{suffix}"))


def _comparison(splink_settings: dict[str, Any], name: str) -> list[dict[str, Any]]:
    for comparison in splink_settings["comparisons"]:
        if comparison["output_column_name"] == name:
            return list(comparison["comparison_levels"])
    raise KeyError(name)
