"""References that point inside a page: a Bundle entry's ``fullUrl`` (``urn:uuid:...``), a
``contained`` resource (``#id``) and a conditional Patient reference (``Patient?identifier=...``),
resolved to the forms the FHIR normalizer reads (transforms/fhir.py).

A transaction, collection or message Bundle (``redox-etl load``, pushed notifications) names the
resources it carries by ``fullUrl`` before any server gave them an id, and a resource may carry a
practitioner it names as ``contained``. Neither form names the record by itself; this module finds
the resource meant in the same page and rewrites the reference, in the copy that is decoded, to:

- ``Type/id`` when the target entry has an ``id`` (the key its own row has in the lake);
- else ``Type?identifier=system|value`` with ``identifier`` set (a practitioner's NPI first), the
  conditional form the normalizer reads as the identifier; a contained resource is always read this
  way, since its ``id`` is local to the resource that contains it;
- a conditional ``Patient?identifier=system|value`` becomes ``Patient/id`` of the Patient in the
  page that carries that identifier.

A reference with no ``display`` takes the target's name (a provider's name column is then filled).

Invariants: the page's raw text is never changed (rows keep the JSON the source sent: only the
decode reads the rewritten copy); a reference that cannot be resolved is left as sent, so the
normalizer sees it still in an inside-the-page form (``unresolved``): a clinical record whose patient
is one is quarantined with the reason ``subject: Patient reference not resolved``, and every other
such reference is counted (``count_unresolved``), never silently null. Pure: no I/O.
"""

import copy
import re
from collections.abc import Iterator
from typing import Any, Final

import polars as pl

from transforms import common

NPI_SYSTEM: Final = "http://hl7.org/fhir/sid/us-npi"

# A body holding one of these may need resolving: only such pages take the Python path.
SUSPECT: Final = r'"reference"\s*:\s*"(?:urn:|#|Patient\?)'
# A reference still in one of these forms after ``resolve`` points at nothing the page holds.
UNRESOLVED: Final = r"^(?:urn:|#|Patient\?)"

_CONDITIONAL: Final = re.compile(r"^(\w+)\?identifier=(?:([^|&]*)(?:\||%7[Cc]))?([^&]+)$")


def _identifiers(resource: dict[str, Any]) -> list[tuple[str | None, str]]:
    found = resource.get("identifier")
    items = found if isinstance(found, list) else [found] if isinstance(found, dict) else []
    out = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("value"), str) and item["value"]:
            system = item.get("system")
            out.append((system if isinstance(system, str) else None, item["value"]))
    # A practitioner is named by its NPI wherever it has one (that is what the id columns hold).
    return sorted(out, key=lambda pair: pair[0] != NPI_SYSTEM)


def _name(resource: dict[str, Any]) -> str | None:
    names = resource.get("name")
    if isinstance(names, str):
        return names
    first = names[0] if isinstance(names, list) and names and isinstance(names[0], dict) else None
    if first is None:
        return None
    if isinstance(first.get("text"), str):
        return str(first["text"])
    given = first.get("given")
    parts = [
        p
        for p in [*(given if isinstance(given, list) else []), first.get("family")]
        if isinstance(p, str) and p
    ]
    return " ".join(parts) or None


def _pointing_at(target: dict[str, Any], *, use_id: bool) -> dict[str, Any] | None:
    """The Reference fields that name ``target``: literal, else conditional by identifier."""
    kind = target.get("resourceType")
    if not isinstance(kind, str):
        return None
    if use_id and isinstance(target.get("id"), str) and target["id"]:
        return {"reference": f"{kind}/{target['id']}"}
    identifiers = _identifiers(target)
    if not identifiers:
        return None
    system, value = identifiers[0]
    named = f"{system}|{value}" if system else value
    return {
        "reference": f"{kind}?identifier={named}",
        "identifier": {"system": system, "value": value},
    }


def _references(node: Any) -> Iterator[dict[str, Any]]:
    """Every Reference object (a dict with a string ``reference``) in ``node``, not in ``contained``."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node
        for key, value in node.items():
            if key != "contained":
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def resolve(page: dict[str, Any]) -> dict[str, Any]:
    """A copy of the Bundle ``page`` with its inside-the-page references rewritten (module docstring)."""
    entries = page.get("entry")
    if not isinstance(entries, list):
        return page
    page = copy.deepcopy(page)
    entries = page["entry"]
    by_url: dict[str, dict[str, Any]] = {}
    patients: dict[tuple[str | None, str], dict[str, Any]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            continue
        resource = entry["resource"]
        if isinstance(entry.get("fullUrl"), str):
            by_url[entry["fullUrl"]] = resource
        if resource.get("resourceType") == "Patient" and isinstance(resource.get("id"), str):
            for system, value in _identifiers(resource):
                patients.setdefault((system, value), resource)
                patients.setdefault((None, value), resource)
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        held = resource.get("contained")
        contained = {
            c["id"]: c
            for c in (held if isinstance(held, list) else [])
            if isinstance(c, dict) and isinstance(c.get("id"), str)
        }
        for ref in list(_references(resource)):
            text = ref["reference"]
            target, use_id = None, True
            if text.startswith("#"):
                target, use_id = contained.get(text[1:]), False
            elif text in by_url:
                target = by_url[text]
            named = _pointing_at(target, use_id=use_id) if target is not None else None
            if named is not None:
                if not isinstance(ref.get("display"), str) and (name := _name(target or {})):
                    ref["display"] = name
                ref.update(named)
                text = named["reference"]
            match = _CONDITIONAL.match(text)
            if match and match.group(1) == "Patient":
                system, value = match.group(2) or None, match.group(3)
                patient = patients.get((system, value)) or patients.get((None, value))
                if patient is not None:
                    ref["reference"] = f"Patient/{patient['id']}"
    return page


def count_unresolved(pages: pl.LazyFrame, resource_type: str) -> int:
    """References of ``resource_type``'s records in ``pages`` that point inside the page at nothing
    it holds (after ``resolve``). Only pages with such a form are parsed (``SUSPECT``)."""
    bodies = pages.select("body").filter(pl.col("body").str.contains(SUSPECT)).collect()["body"]
    unresolved = re.compile(UNRESOLVED)
    count = 0
    for body in bodies:
        page, problem = common.load_json(body)
        if problem or not isinstance(page, dict):
            continue
        for entry in resolve(page).get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == resource_type:
                count += sum(1 for ref in _references(resource) if unresolved.match(ref["reference"]))
    return count
