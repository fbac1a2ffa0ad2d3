"""The Python path for Data Model responses the vectorized decode rejects.

``repairer(entity)`` rewrites one page so that it decodes with ``chains.page_dtype(entity)``:
an unreadable page becomes a page-error object, and a record or container of the wrong JSON shape
is replaced by a *marker* (the reason and the original JSON in the ``MARK`` fields).

Invariants: a broken container still yields exactly one marker at its chain's leaf level, so the
records are counted and quarantined, never dropped; a context patient that is unreadable marks its
records instead of hiding them; reasons name Data Model field paths, never values (no PHI).
"""

from collections.abc import Sequence
from typing import Any, Final

from transforms import common
from transforms.datamodel.chains import CHAINS, Level
from transforms.datamodel.dtypes import META, PATIENT, PATIENT_CTX

# Page-level reasons; the vectorized path in ``locate`` spells the same ones for the pages it reads.
NOT_AN_OBJECT: Final = "page: not a JSON object"
NO_META: Final = "page: not a Data Model response (no Meta)"
META_ERRORS: Final = "page: Meta.Errors present (Redox reported a failed request)"


def repairer(entity: str) -> common.Repair:
    """The repair function ``common.decode_expr`` calls for one page body of ``entity``."""
    chains = CHAINS[entity]

    def repair(body: str | None, generic: bool) -> str:
        page, problem = common.load_json(body)
        problem = problem or _page_problem(page)
        if problem:
            return common.dumps({common.PAGE_ERROR: problem})
        out: dict[str, Any] = {"Meta": page["Meta"]}
        for chain in chains:
            top = chain.levels[0].key
            if top in page and top not in out:
                out[top] = page[top]
            if chain.sibling and chain.sibling[0] in page and chain.sibling[0] not in out:
                out[chain.sibling[0]] = page[chain.sibling[0]]
        for chain in chains:
            if chain.sibling:
                _repair_sibling(out, chain.sibling)
        for chain in chains:
            if out.get(chain.levels[0].key) is not None:
                _repair_level(out, chain.levels, "", generic)
        return common.dumps(out)

    return repair


def _page_problem(page: Any) -> str | None:
    if not isinstance(page, dict):
        return NOT_AN_OBJECT
    meta = page.get("Meta")
    if not isinstance(meta, dict):
        return NO_META
    if common.type_mismatch(meta, META):
        return "page: Meta has a field of the wrong JSON type"
    if meta.get("Errors"):
        return META_ERRORS
    return None


def _normalize_variants(patient: Any) -> None:
    """Rewrite known shape variants in place (ClinicalSummary sends EmailAddresses as objects)."""
    if not isinstance(patient, dict):
        return
    demo = patient.get("Demographics")
    if isinstance(demo, dict) and isinstance(demo.get("EmailAddresses"), list):
        demo["EmailAddresses"] = [
            e.get("Address") if isinstance(e, dict) else e for e in demo["EmailAddresses"]
        ]


def _marker(value: Any, reason: str) -> dict[str, Any]:
    return {common.RECORD_ERROR: reason, common.RECORD_RAW: common.dumps(value)}


def _leaf_marker(levels: Sequence[Level], value: Any, reason: str) -> Any:
    """A broken container rewritten so that exactly one quarantined record sits at the leaf level."""
    node: Any = _marker(value, reason)
    for level in reversed(levels[1:]):
        node = {level.key: [node] if level.many else node}
    return node


def _repair_level(parent: dict[str, Any], levels: Sequence[Level], path: str, generic: bool) -> None:
    level = levels[0]
    here = f"{path}.{level.key}" if path else level.key
    value = parent.get(level.key)
    if value is None:
        return
    if level.many and not isinstance(value, list):
        parent[level.key] = [_leaf_marker(levels, value, common.wrong_type_reason(here))]
        return
    items = value if level.many else [value]
    fixed = []
    for item in items:
        item_path = f"{here}[]" if level.many else here
        if not isinstance(item, dict):
            fixed.append(_leaf_marker(levels, item, common.wrong_type_reason(item_path)))
            continue
        if level.own == PATIENT:
            _normalize_variants(item)
        bad = "(record)" if generic else common.type_mismatch(item, level.own)
        if level.child is None:
            fixed.append(_marker(item, _reason_at(item_path, bad)) if bad else item)
            continue
        if bad:
            # The context is unreadable, but its records are still counted and quarantined.
            kept = {level.child.key: item.get(level.child.key), **_marker(item, _reason_at(item_path, bad))}
            item = kept
        _repair_level(item, levels[1:], item_path, generic)
        fixed.append(item)
    parent[level.key] = fixed if level.many else fixed[0]


def _reason_at(path: str, bad: str) -> str:
    return common.wrong_type_reason(bad if bad == "(record)" else f"{path}.{bad}")


def _repair_sibling(page: dict[str, Any], path: tuple[str, ...]) -> None:
    node: Any = page
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return
    ctx = node.get(path[-1])
    if ctx is None:
        return
    where = ".".join(path)
    if not isinstance(ctx, dict):
        node[path[-1]] = _marker(ctx, common.wrong_type_reason(where))
        return
    bad = common.type_mismatch(ctx, PATIENT_CTX)
    if bad:
        node[path[-1]] = _marker(ctx, common.wrong_type_reason(f"{where}.{bad}"))
