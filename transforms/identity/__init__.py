"""Patient identity: link the same human across two patient sources and keep a stable ``person_key``.

Each step is a pure function on polars frames, in the module named for it:

- ``records``: the input: latest version of each record, the two sides, outside lists conformed;
- ``features``: comparison columns (folded names, nickname groups from ``nicknames``, Soundex...);
- ``deterministic``: links on an equal identifier of a shared (enterprise/MPI) system;
- ``comparisons`` + ``model``: a Fellegi-Sunter model (Splink, trained without labels) that scores
  candidate pairs and explains each score with per-comparison match weights, narrowed by ``usable``
  to the comparisons and training sessions the two inputs have data for;
- ``decide``: links above ``LINK_THRESHOLD``, a review queue down to ``REVIEW_THRESHOLD``, recorded
  decisions honoured, conflicting pairs refused, each record linked at most once;
- ``persons``: links clustered into persons keeping every existing ``person_key`` (merges and splits
  go to ``person_history``), and golden records by documented survivorship rules;
- ``run``: ``resolve``, all of the above over one ``patients`` table (what the asset calls);
- ``evaluate``: precision/recall of a crosswalk against a truth (benchmark and tests only);
- ``tables``: the schemas of everything above; ``errors``: ``IdentityError``.

Invariants kept across the package:
- a link always joins one record of the left input to one record of the right input, and each
  record has at most one link (a surface holds one record per person);
- a ``person_key`` once issued is never renumbered and never reissued;
- no value from a patient record (name, birth date, identifier, address, SSN) is logged or put into
  an exception message.

This module only re-exports the names callers use, so ``from transforms import identity`` is the one
import a caller needs.
"""

from transforms.identity.comparisons import BLOCKING_RULES
from transforms.identity.decide import AMBIGUITY_MARGIN, LINK_THRESHOLD, REVIEW_THRESHOLD, decide
from transforms.identity.deterministic import ENTERPRISE_SYSTEMS, deterministic_links
from transforms.identity.errors import IdentityError
from transforms.identity.evaluate import evaluate
from transforms.identity.features import features
from transforms.identity.model import MIN_MATCH_WEIGHT, MODEL_FORMAT, score_pairs, train_model
from transforms.identity.persons import cluster, golden_records
from transforms.identity.records import conform_patients, latest_versions, normalize_system, split_surfaces
from transforms.identity.run import IdentityResult, resolve
from transforms.identity.tables import (
    EVIDENCE,
    IDENTITY_DECISIONS,
    IDENTITY_REVIEW,
    PAIRS,
    PERSON_CROSSWALK,
    PERSON_HISTORY,
    PERSONS,
    TABLES,
    empty,
    pair_id,
)
from transforms.identity.usable import MIN_COMPARISONS

__all__ = [
    "AMBIGUITY_MARGIN",
    "BLOCKING_RULES",
    "ENTERPRISE_SYSTEMS",
    "EVIDENCE",
    "IDENTITY_DECISIONS",
    "IDENTITY_REVIEW",
    "LINK_THRESHOLD",
    "MIN_COMPARISONS",
    "MIN_MATCH_WEIGHT",
    "MODEL_FORMAT",
    "PAIRS",
    "PERSONS",
    "PERSON_CROSSWALK",
    "PERSON_HISTORY",
    "REVIEW_THRESHOLD",
    "TABLES",
    "IdentityError",
    "IdentityResult",
    "cluster",
    "conform_patients",
    "decide",
    "deterministic_links",
    "empty",
    "evaluate",
    "features",
    "golden_records",
    "latest_versions",
    "normalize_system",
    "pair_id",
    "resolve",
    "score_pairs",
    "split_surfaces",
    "train_model",
]
