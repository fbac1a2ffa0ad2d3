"""The FHIR R4 surface: reads, and searches evaluated against a store snapshot and paged as Redox
does. Resources come from sandbox/fhir_render.py, parameters are parsed by sandbox/fhir_params.py;
each record version's JSON bytes are memoized, so a page is built by joining cached bytes and no
pydantic model is touched on the hot path.

Invariants:
- a search is evaluated once against a store snapshot (``as_of_seq``) and paged from that snapshot
  through an opaque cursor, so records changing between pages are neither skipped nor repeated;
- cursors and next links carry no PHI: the query travels inside the cursor, AES-GCM encrypted and
  authenticated with a per-process key, and the link is ``{fhir_base}/{Resource}/_search?_cursor=``.
"""

import base64
import bisect
import collections
import dataclasses
import json
import os
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, tzinfo
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sandbox.fhir_params import (
    SEARCH_PARAMS,
    SearchError,
    and_of_ors,
    indexed_identifier,
    intersect,
    parse_date_param,
    patient_id,
    record_filter,
)
from sandbox.fhir_render import RENDERERS, fhir_instant, malform
from sandbox.model import Kind, Version
from sandbox.store import Bounds

RESOURCES: dict[str, Kind] = {
    "Patient": "patients",
    "Encounter": "encounters",
    "Observation": "results",
    "Appointment": "appointments",
}
DEFAULT_COUNT = 50
MAX_COUNT = 1000


class StoreLike(Protocol):
    head_seq: int
    clock: datetime
    cache: dict[Any, bytes]

    def current(self, kind: Kind, surface: str, source_id: str, *, as_of_seq: int | None = None) -> Any: ...

    def query(self, kind: Kind, surface: str, **kwargs: Any) -> list[Version]: ...


def operation_outcome(diagnostics: str, code: str = "invalid", severity: str = "error") -> bytes:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }
    return json.dumps(body, separators=(",", ":")).encode()


# -- searching and paging -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Page:
    status: int
    body: bytes


@dataclasses.dataclass
class _Result:
    versions: list[Version]
    ids: list[str]


class FhirSurface:
    """Searches and reads for one sandbox. Single-threaded by design: the event loop calls it."""

    def __init__(
        self,
        store: Callable[[], StoreLike],
        *,
        fhir_base: str,
        tz: tzinfo,
        faults: Any = None,
        cache_size: int = 512,
    ) -> None:
        self._store = store
        self._resource_tag = f"fhir-json|{tz}"
        self.fhir_base = fhir_base
        self.tz = tz
        self.faults = faults
        self._cipher = AESGCM(AESGCM.generate_key(bit_length=128))
        self._results: collections.OrderedDict[tuple[Any, ...], _Result] = collections.OrderedDict()
        self._cache_size = cache_size

    @property
    def fhir_base(self) -> str:
        return self._fhir_base

    @fhir_base.setter
    def fhir_base(self, value: str) -> None:
        # Entries embed fullUrl, so their cache key names the base they were built for.
        self._fhir_base = value
        self._entry_tag = f"fhir-entry|{self._resource_tag}|{value}"

    # -- cached rendering -----------------------------------------------------------------------

    def resource_bytes(self, resource: str, version: Version) -> bytes:
        # seq names one version store-wide, so (tag, seq) is as good a key as (kind, id, version).
        key = (self._resource_tag, version.seq)
        cache = self._store().cache
        cached = cache.get(key)
        if cached is None:
            rendered = RENDERERS[resource](version, self.tz)
            cached = cache[key] = json.dumps(rendered, separators=(",", ":")).encode()
        return cached

    def _entries(self, resource: str, page: list[Version], bodies: list[bytes | None]) -> bytes:
        """The entries of one page: cached bytes joined, rendering only versions never served."""
        cache = self._store().cache
        tag = self._entry_tag
        out = []
        for version, body in zip(page, bodies, strict=True):
            if body is not None:
                out.append(self._wrap(resource, version, body))
                continue
            cached = cache.get((tag, version.seq))
            if cached is None:
                cached = cache[(tag, version.seq)] = self._wrap(
                    resource, version, self.resource_bytes(resource, version)
                )
            out.append(cached)
        return b",".join(out)

    def _wrap(self, resource: str, version: Version, body: bytes) -> bytes:
        url = f"{self.fhir_base}/{resource}/{version.record.source_id}"
        return b"".join(
            (b'{"fullUrl":', json.dumps(url).encode(), b',"resource":', body, b',"search":{"mode":"match"}}')
        )

    # -- cursor ---------------------------------------------------------------------------------

    def _seal(self, payload: dict[str, Any]) -> str:
        nonce = os.urandom(12)
        sealed = self._cipher.encrypt(nonce, json.dumps(payload, separators=(",", ":")).encode(), None)
        return base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def _open(self, cursor: str) -> dict[str, Any]:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            payload = json.loads(self._cipher.decrypt(raw[:12], raw[12:], None))
        except (ValueError, InvalidTag):
            raise SearchError(
                "Invalid or expired _cursor; restart the search without it", code="invalid"
            ) from None
        if not isinstance(payload, dict):
            raise SearchError("Invalid _cursor")
        return payload

    # -- public API -----------------------------------------------------------------------------

    def read(self, resource: str, source_id: str) -> Page:
        kind = RESOURCES.get(resource)
        if kind is None:
            return Page(404, operation_outcome(f"Unknown resource type {resource!r}", "not-supported"))
        version = self._store().current(kind, "fhir", source_id)
        if version is None:
            return Page(404, operation_outcome(f"{resource}/{source_id} not found", "not-found"))
        body = self.resource_bytes(resource, version)
        broken = self.faults.malform(1) if self.faults is not None else None
        if broken is not None:
            body = json.dumps(malform(json.loads(body), broken[1])).encode()
            self.faults.note_malformed("fhir", resource, source_id, broken[1])
        return Page(200, body)

    def search(self, resource: str, pairs: Sequence[tuple[str, str]]) -> Page:
        try:
            return self._search(resource, pairs)
        except SearchError as err:
            return Page(err.status, operation_outcome(err.diagnostics, err.code))

    def _search(self, resource: str, pairs: Sequence[tuple[str, str]]) -> Page:
        if resource not in RESOURCES:
            raise SearchError(f"Unknown resource type {resource!r}", status=404, code="not-supported")
        cursors = [v for k, v in pairs if k == "_cursor"]
        if cursors:
            # The query lives in the cursor; anything else sent beside it is ignored [I].
            state = self._open(cursors[-1])
            if state.get("r") != resource:
                raise SearchError("This _cursor belongs to a different resource type")
            params: dict[str, list[str]] = state["q"]
            as_of, after, count = int(state["s"]), str(state["a"]), int(state["n"])
        else:
            params = self._parse(resource, pairs)
            count = self._count(params.pop("_count", []))
            params.pop("_format", None)
            as_of, after = self._store().head_seq, ""
        result = self._evaluate(resource, params, as_of)
        start = bisect.bisect_right(result.ids, after) if after else 0
        page = result.versions[start : start + count]
        more = start + count < len(result.versions)
        bodies: list[bytes | None] = [None] * len(page)
        if self.faults is not None and page:
            broken = self.faults.malform(len(page))
            if broken is not None:
                index, mode = broken
                rendered = json.loads(self.resource_bytes(resource, page[index]))
                bodies[index] = json.dumps(malform(rendered, mode), separators=(",", ":")).encode()
                self.faults.note_malformed("fhir", resource, page[index].record.source_id, mode)
        links = [{"relation": "self", "url": self._self_url(resource, cursors[-1] if cursors else None)}]
        if more and page:
            last = page[-1].record.source_id
            if self.faults is not None and len(page) >= 2 and self.faults.duplicate():
                # The next page starts one record early: the last record here is served twice.
                last = page[-2].record.source_id
            cursor = self._seal({"r": resource, "q": params, "s": as_of, "a": last, "n": count})
            links.append({"relation": "next", "url": self._self_url(resource, cursor)})
        head = {
            "resourceType": "Bundle",
            "id": uuid.uuid4().hex,
            "meta": {"lastUpdated": fhir_instant(self._store().clock, self.tz)},
            "type": "searchset",
            "total": len(result.versions),
            "link": links,
        }
        encoded = json.dumps(head, separators=(",", ":")).encode()
        if not page:
            return Page(200, encoded)
        entries = self._entries(resource, page, bodies)
        return Page(200, b"".join((encoded[:-1], b',"entry":[', entries, b"]}")))

    def _self_url(self, resource: str, cursor: str | None) -> str:
        url = f"{self.fhir_base}/{resource}/_search"
        return f"{url}?_cursor={cursor}" if cursor else url

    @staticmethod
    def _count(values: list[str]) -> int:
        if not values:
            return DEFAULT_COUNT
        try:
            count = int(values[-1])
        except ValueError:
            raise SearchError("Invalid value for search parameter '_count': not an integer") from None
        if count < 0:
            raise SearchError("Invalid value for search parameter '_count': must not be negative")
        return min(count, MAX_COUNT)

    @staticmethod
    def _parse(resource: str, pairs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
        allowed = SEARCH_PARAMS[resource]
        params: dict[str, list[str]] = {}
        for name, value in pairs:
            base, colon, modifier = name.partition(":")
            if base not in allowed:
                raise SearchError(f"Unknown search parameter {name!r} for {resource}", code="not-supported")
            if colon:
                raise SearchError(
                    f"Unsupported modifier {modifier!r} on search parameter {base!r}", code="not-supported"
                )
            params.setdefault(base, []).append(value)
        if resource == "Patient" and not (
            "_id" in params or "identifier" in params or {"given", "family", "birthdate"} <= params.keys()
        ):
            raise SearchError(
                "Patient search requires _id, identifier, or all of given, family and birthdate",
                code="required",
            )
        return params

    def _evaluate(self, resource: str, params: dict[str, list[str]], as_of: int) -> _Result:
        key = (resource, json.dumps(params, sort_keys=True), as_of)
        cached = self._results.get(key)
        if cached is not None:
            self._results.move_to_end(key)
            return cached
        kind = RESOURCES[resource]
        query: dict[str, Any] = {"as_of_seq": as_of}
        ids = and_of_ors(params.get("_id", []))
        if ids is not None:
            query["source_ids"] = ids
        patient_values = params.get("patient", []) + params.get("subject", [])
        patients = and_of_ors([",".join(patient_id(v) for v in value.split(",")) for value in patient_values])
        if patients is not None:
            query["patient_ids"] = patients
        identifier = indexed_identifier(resource, params.get("identifier", []))
        if identifier is not None:
            query["identifier"] = identifier
        when = self._window("date", params.get("date", []))
        if when is not None:
            query["when"] = when
        updated = self._window("_lastUpdated", params.get("_lastUpdated", []))
        if updated is not None:
            query["updated"] = updated
        versions: list[Version] = []
        if not (ids is not None and not ids) and not (patients is not None and not patients):
            versions = self._store().query(kind, "fhir", **query)
        keep = record_filter(resource, params)
        if keep is not None:
            versions = [v for v in versions if keep(v.record)]
        versions.sort(key=lambda v: v.record.source_id)
        result = _Result(versions, [v.record.source_id for v in versions])
        self._results[key] = result
        if len(self._results) > self._cache_size:
            self._results.popitem(last=False)
        return result

    def _window(self, name: str, values: list[str]) -> Bounds | None:
        window: Bounds | None = None
        for value in values:
            if "," in value:
                # OR-ed date ranges would need a union of windows; no Redox client sends them [I].
                raise SearchError(f"Comma-separated values are not supported for {name!r}; repeat it instead")
            bound = parse_date_param(name, value, self.tz)
            window = bound if window is None else intersect(window, bound)
        if window is not None:
            window = Bounds(
                window.lo.astimezone(UTC) if window.lo else None,
                window.lo_inclusive,
                window.hi.astimezone(UTC) if window.hi else None,
                window.hi_inclusive,
            )
        return window
