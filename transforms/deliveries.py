"""What a pushed delivery is: its surface, its event, and the key that makes a redelivery harmless.

Redox delivers at least once: a message it already sent (and we acknowledged) may come again, with
the same log id and a new attempt id. ``identify`` reads the ids Redox gives a message so the inbox
can tell a redelivery from a new message:

- Data Model: ``Meta.Logs[0].ID`` (the message's log; ``AttemptID`` names the try, not the message);
- FHIR notification (a ``Bundle`` of type ``message``): the ``MessageHeader`` id (entry 0), else the
  Bundle's own id;
- lacking those, a SHA-256 of the body, so byte-identical redeliveries still collapse.

Invariant: the key depends only on the message, never on the attempt or the arrival, and the label
(``Results.New``, ``FHIR:<event>``) names the event without any value from the record (no PHI).
"""

import dataclasses
import hashlib
from typing import Any, Final, Literal

DeliverySurface = Literal["fhir", "datamodel"]
EVENT_URI_PREFIX: Final = "https://fhir.redoxengine.com/EventDefinition/"


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    key: str
    surface: DeliverySurface | None  # None: neither a Redox Data Model message nor a FHIR Bundle
    event: str
    attempt: str | None


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def identify(parsed: Any, body: bytes) -> Identity:
    """The delivery's identity from its parsed JSON (``parsed``) and raw bytes (for the hash)."""
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if not isinstance(parsed, dict):
        return Identity(digest, None, "(not an object)", None)
    meta = parsed.get("Meta")
    if isinstance(meta, dict):
        event = f"{_text(meta.get('DataModel')) or '?'}.{_text(meta.get('EventType')) or '?'}"
        logs = meta.get("Logs")
        first = logs[0] if isinstance(logs, list) and logs and isinstance(logs[0], dict) else {}
        log_id = _text(first.get("ID"))
        key = f"log:{log_id}" if log_id else digest
        return Identity(key, "datamodel", event[:80], _text(first.get("AttemptID")))
    if parsed.get("resourceType") == "Bundle":
        entries = parsed.get("entry")
        header: dict[str, Any] = {}
        if isinstance(entries, list) and entries and isinstance(entries[0], dict):
            resource = entries[0].get("resource")
            if isinstance(resource, dict) and resource.get("resourceType") == "MessageHeader":
                header = resource
        event_uri = _text(header.get("eventUri")) or ""
        event = "FHIR:" + (event_uri.removeprefix(EVENT_URI_PREFIX) if event_uri else "Bundle")
        if header_id := _text(header.get("id")):
            return Identity(f"fhir-message:{header_id}", "fhir", event[:80], None)
        if bundle_id := _text(parsed.get("id")):
            return Identity(f"fhir-bundle:{bundle_id}", "fhir", event[:80], None)
        return Identity(digest, "fhir", event[:80], None)
    return Identity(digest, None, "(unknown shape)", None)
