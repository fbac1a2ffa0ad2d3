"""Measuring a crosswalk: pairwise precision, recall and F1 of cross-surface links against a truth.

Used by the benchmark and the tests, which bring the truth (the sandbox's, or a generated frame's);
the pipeline itself never measures itself, since real Redox has no truth.

Invariant: only records present in both the crosswalk and the truth count, and the result is counts
and ratios only (no record value or id).
"""

import polars as pl


def evaluate(
    crosswalk: pl.DataFrame,
    truth_persons: pl.DataFrame,
    *,
    surfaces: tuple[str, str] = ("fhir", "datamodel"),
) -> dict[str, float | int]:
    """Pairwise precision/recall/F1 of cross-surface links against truth.

    ``truth_persons`` has ``person_id``, ``surface``, ``source_patient_id``. A predicted pair is a
    (left-surface record, right-surface record) sharing a person_key; a true pair shares a
    person_id. Only records present in both frames count.
    """
    truth = truth_persons.select(
        "person_id", source_surface=pl.col("surface"), source_id=pl.col("source_patient_id")
    )
    both = crosswalk.select("person_key", "source_surface", "source_id").join(
        truth, on=["source_surface", "source_id"], how="inner"
    )
    left_s, right_s = surfaces

    def pairs(group: str) -> pl.DataFrame:
        lhs = both.filter(pl.col("source_surface") == left_s).select(group, a="source_id")
        rhs = both.filter(pl.col("source_surface") == right_s).select(group, b="source_id")
        return lhs.join(rhs, on=group).select("a", "b").unique()

    predicted = pairs("person_key")
    true = pairs("person_id")
    tp = predicted.join(true, on=["a", "b"], how="inner").height
    fp = predicted.height - tp
    fn = true.height - tp
    precision = tp / predicted.height if predicted.height else 1.0
    recall = tp / true.height if true.height else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    false_merges = (
        both.group_by("person_key").agg(n=pl.col("person_id").n_unique()).filter(pl.col("n") > 1).height
    )
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "true_pairs": true.height,
        "predicted_pairs": predicted.height,
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "false_merge_persons": false_merges,
    }
