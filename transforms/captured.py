"""Captured payloads (files a user hands ``redox-etl load``) -> the pages the normalizers read.

A captured file holds one JSON document or JSON Lines (one document a line; FHIR bulk NDJSON is
that). Each document's shape is detected on its own:

- a FHIR ``Bundle`` (searchset, collection, transaction, batch, message, ...): its entries of a
  table's resource type become one searchset page per table, entries kept as they are (with
  ``request``/``fullUrl``), so the FHIR normalizer reads them as it reads a pulled page. Entries
  they reference from inside the Bundle (by ``fullUrl``, or a Patient by conditional identifier)
  ride along on that page, so the normalizer can resolve the reference (transforms/fhir_refs.py);
  they are of another resource type there, so they are skipped, not counted twice;
- a single FHIR resource (a file of one, or an NDJSON line): consecutive resources of one type are
  wrapped into searchset Bundles of at most ``PAGE_ENTRIES`` entries;
- a Data Model message (``Meta.DataModel``): one page, under every table its data model feeds
  (``DATAMODEL_TABLES``); the Data Model normalizer locates the records inside, for queries'
  responses and pushed events alike (transforms/datamodel/chains.py).

Invariants:
- nothing is dropped silently: a document that is not JSON, or whose shape is none of these,
  becomes an ``Unrouted`` item with a reason (it is quarantined by the caller); a FHIR resource or
  Data Model message that feeds no table (a Condition, an Order message) is *counted* by type in
  ``Captured.other``, so the summary says what the file held beyond the four tables;
- reasons name a line number and a shape, never a value (no PHI);
- pure: text in, pages out; no file, no network.
"""

import dataclasses
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any, Final

# A table's FHIR resource type (the normalizers' own mapping, transforms.fhir.RESOURCE_TYPES,
# is what decides which entries of a page they read; this one routes pages to them).
FHIR_TABLES: Final[dict[str, str]] = {
    "Patient": "patients",
    "Encounter": "encounters",
    "Observation": "results",
    "Appointment": "appointments",
}

# Which tables a Data Model's messages feed. Every Data Model message also feeds ``patients``
# through the patients stream's reads (transforms/streams.py), so it is not listed again here.
DATAMODEL_TABLES: Final[dict[str, tuple[str, ...]]] = {
    "PatientSearch": ("patients",),
    "PatientAdmin": ("encounters",),
    "Results": ("results",),
    "Scheduling": ("appointments",),
    "Clinical Summary": ("encounters", "results"),
}

# Entries per page when single resources (NDJSON lines) are wrapped into Bundles: the size of a
# pulled FHIR page, so a captured page costs the normalizer what a pulled one does.
PAGE_ENTRIES: Final = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class Unrouted:
    """A document no normalizer can read: its position, why, and its text (kept for quarantine)."""

    where: str
    reason: str
    raw: str


@dataclasses.dataclass
class Captured:
    """One file's documents, as pages per (surface, table), plus what feeds no table."""

    pages: dict[tuple[str, str], list[str]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    unrouted: list[Unrouted] = dataclasses.field(default_factory=list)
    # "fhir:Condition" / "datamodel:Order" -> how many records of that kind feed no table.
    other: Counter[str] = dataclasses.field(default_factory=Counter)
    documents: int = 0


def documents(text: str) -> Iterator[tuple[str, Any | None, str]]:
    """``(where, parsed or None, raw)`` per document: the whole text if it is one JSON value, else
    one per non-blank line (JSON Lines)."""
    try:
        yield "document", json.loads(text), text
        return
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line), line
        except json.JSONDecodeError as error:
            yield f"line {number}", None, f"{line}\n-- not JSON: {error.msg}"


def read(text: str) -> Captured:
    """Detect each document's shape and build the pages (see the module docstring)."""
    out = Captured()
    pending: dict[str, list[Any]] = defaultdict(list)  # resource type -> single resources

    def flush(resource_type: str) -> None:
        resources = pending.pop(resource_type, [])
        for start in range(0, len(resources), PAGE_ENTRIES):
            chunk = resources[start : start + PAGE_ENTRIES]
            out.pages[("fhir", FHIR_TABLES[resource_type])].append(
                _bundle("searchset", [{"resource": r} for r in chunk])
            )

    for where, doc, raw in documents(text):
        out.documents += 1
        if doc is None:
            out.unrouted.append(Unrouted(where, "not JSON", raw))
        elif not isinstance(doc, dict):
            out.unrouted.append(Unrouted(where, "not a JSON object", raw))
        elif doc.get("resourceType") == "Bundle":
            _read_bundle(doc, where, raw, out)
        elif isinstance(doc.get("resourceType"), str):
            kind = doc["resourceType"]
            if kind in FHIR_TABLES:
                pending[kind].append(doc)
                if len(pending[kind]) >= PAGE_ENTRIES:
                    flush(kind)
            else:
                out.other[f"fhir:{kind}"] += 1
        elif isinstance(doc.get("Meta"), dict) and isinstance(doc["Meta"].get("DataModel"), str):
            model = doc["Meta"]["DataModel"]
            tables = DATAMODEL_TABLES.get(model)
            if tables is None:
                out.other[f"datamodel:{model}"] += 1
            for table in tables or ():
                out.pages[("datamodel", table)].append(raw if where == "document" else json.dumps(doc))
        else:
            out.unrouted.append(
                Unrouted(
                    where,
                    "neither a FHIR resource (resourceType) nor a Data Model message (Meta.DataModel)",
                    raw,
                )
            )
    for kind in list(pending):
        flush(kind)
    return out


def _read_bundle(doc: dict[str, Any], where: str, raw: str, out: Captured) -> None:
    entries = doc.get("entry")
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        out.unrouted.append(Unrouted(where, "Bundle.entry is not a list", raw))
        return
    by_table: dict[str, list[Any]] = defaultdict(list)
    for position, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        kind = resource.get("resourceType") if isinstance(resource, dict) else None
        if not isinstance(kind, str):
            out.unrouted.append(
                Unrouted(
                    f"{where} entry {position}",
                    "Bundle entry without a resource.resourceType",
                    json.dumps(entry),
                )
            )
        elif kind == "Bundle" and isinstance(resource, dict):
            # A Bundle inside a Bundle (a message's payload, a batch response): read it the same way.
            _read_bundle(resource, f"{where} entry {position}", json.dumps(resource), out)
        elif kind in FHIR_TABLES:
            by_table[FHIR_TABLES[kind]].append(entry)
        else:
            out.other[f"fhir:{kind}"] += 1
    for table, kept in by_table.items():
        for start in range(0, len(kept), PAGE_ENTRIES):
            chunk = kept[start : start + PAGE_ENTRIES]
            out.pages[("fhir", table)].append(_bundle("searchset", chunk + _referenced(chunk, entries)))


def _referenced(chunk: list[Any], entries: list[Any]) -> list[Any]:
    """The entries of the Bundle (of other types than ``chunk``'s) that ``chunk``'s resources name
    by ``fullUrl``, plus its Patients when one is named by a conditional identifier."""
    refs = set(re.findall(r'"reference":\s*"([^"]+)"', json.dumps(chunk)))
    if not refs:
        return []
    kinds = {e["resource"]["resourceType"] for e in chunk}
    conditional = any(r.startswith("Patient?") for r in refs)
    return [
        e
        for e in entries
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") not in kinds
        and (e.get("fullUrl") in refs or (conditional and e["resource"].get("resourceType") == "Patient"))
    ]


def _bundle(kind: str, entries: list[Any]) -> str:
    return json.dumps({"resourceType": "Bundle", "type": kind, "total": len(entries), "entry": entries})
