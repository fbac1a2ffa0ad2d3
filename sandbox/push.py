"""The sandbox's pusher: a subscription that delivers the world's changes to a destination like Redox.

``Pusher`` (started by ``redox-etl sandbox serve --push-to URL --verification-token ...``) first
performs the destination verification handshake (POST ``{"verification-token", "challenge"}`` or
GET ``?challenge=..&verification-token=..``; the answer must carry the challenge), then follows the
store's write log: each new record version (what ``/sandbox/advance`` writes) becomes one message,

- Data Model surface: ``Results.New`` (an Order with the result, the patient beside it),
  ``PatientAdmin.Arrival/Discharge/VisitUpdate`` and ``NewPatient/PatientUpdate``,
  ``Scheduling.New/Reschedule/Cancel/NoShow``, each with ``Meta.Logs[{ID, AttemptID}]``;
- FHIR surface: a notification ``Bundle`` of type ``message``, entry 0 a ``MessageHeader`` (its id
  is the message's id) and the resource after it,

delivered as Redox documents (redox-api.md §5): FIFO, one at a time, the next only after a 2xx; on a
failure or timeout the feed pauses and the same message is retried with a growing wait (a few
seconds up to a cap, both configurable so tests run fast). With ``redeliver`` > 0 it sends an
already-acknowledged message again (same log id, new attempt id), as at-least-once delivery may.

Invariants: the ledger (``ledger()``, served at ``GET /sandbox/push``) lists every acknowledged
delivery in order with its log id, record key and version: the ground truth of what was pushed. A
message is rendered from the version as of its write (``as_of_seq``), so its content is what the
EHR held when the event happened. Nothing is logged but counts and statuses.
"""

import dataclasses
import json
import logging
import random
import threading
import uuid
from datetime import tzinfo
from typing import Any

import httpx

from sandbox import datamodel_render as dmr
from sandbox import fhir_render
from sandbox.model import Appointment, Encounter, Patient, Result, Version

log = logging.getLogger("redox_sandbox.push")

EVENT_URI = "https://fhir.redoxengine.com/EventDefinition/"
SOURCE = {"ID": "3f0c2a8e-5d1b-4b0e-9a57-7c1f1a2b9d10", "Name": "Redox Sandbox EHR"}
DESTINATION = {"ID": "5b7e2c1a-9f4d-4e8a-b3c6-2d1f0e9a8b7c", "Name": "redox-etl webhook"}


@dataclasses.dataclass(frozen=True)
class PushOptions:
    url: str
    token: str
    verification: str = "POST"  # or GET, as a Redox destination's verificationMethod
    retry_first: float = 5.0  # seconds before the first retry of a failed message
    retry_cap: float = 90.0  # the fixed wait the back-off grows to
    timeout: float = 10.0
    redeliver: float = 0.0  # probability of re-sending an acknowledged message
    seed: int = 7


@dataclasses.dataclass
class Message:
    log_id: str
    surface: str
    kind: str
    source_id: str
    seq: int
    version_id: int
    event: str
    body: dict[str, Any]


def _ms(value: Any) -> str:
    return dmr.utc_ms(value)


class Pusher:
    def __init__(self, store: Any, options: PushOptions, *, tz: tzinfo) -> None:
        self.store = store
        self.options = options
        self.tz = tz
        self.cursor = store.head_seq  # a subscription sees what happens after it starts
        self.verified = False
        self.failures = 0
        self._ledger: list[dict[str, Any]] = []
        self._rng = random.Random(options.seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- rendering ---------------------------------------------------------------------------

    def _meta(self, data_model: str, event: str, version: Version, log_id: str) -> dict[str, Any]:
        return {
            "DataModel": data_model,
            "EventType": event,
            "EventDateTime": _ms(version.last_updated),
            "Test": True,
            "Source": dict(SOURCE),
            "Destinations": [dict(DESTINATION)],
            "Logs": [{"ID": log_id, "AttemptID": str(uuid.uuid4())}],
        }

    def _dm_patient(self, patient_source_id: str, seq: int) -> dict[str, Any]:
        version = self.store.current("patients", "datamodel", patient_source_id, as_of_seq=seq)
        if version is None:
            return {"Identifiers": [{"ID": patient_source_id, "IDType": "MR"}]}
        return dmr.render_patient(version)

    def _datamodel(self, version: Version, log_id: str) -> tuple[str, dict[str, Any]]:
        r = version.record
        first = version.version_id == 1
        if isinstance(r, Result):
            order = {
                "ID": dmr.wire_id(r.order_id),
                "TransactionDateTime": _ms(version.last_updated),
                "LastUpdated": _ms(version.last_updated),
                "CollectionDateTime": _ms(r.effective_at),
                "CompletionDateTime": _ms(r.effective_at),
                "Status": "Resulted",
                "ResultsStatus": dmr.order_status({r.status}),
                "Priority": "Routine",
                "Notes": [],
                "ResultCopyProviders": [],
                "Results": [dmr.render_result(version)],
            }
            body = {"Patient": self._dm_patient(r.patient_source_id, version.seq), "Orders": [order]}
            return "Results.New", {"Meta": self._meta("Results", "New", version, log_id), **body}
        if isinstance(r, Encounter):
            event = "Arrival" if first else ("Discharge" if r.status == "finished" else "VisitUpdate")
            visit = dmr.render_visit(version)
            body = {"Patient": self._dm_patient(r.patient_source_id, version.seq), "Visit": visit}
            return f"PatientAdmin.{event}", {
                "Meta": self._meta("PatientAdmin", event, version, log_id),
                **body,
            }
        if isinstance(r, Appointment):
            event = {"cancelled": "Cancel", "noshow": "NoShow"}.get(
                r.status, "New" if first else "Reschedule"
            )
            body = {
                "Patient": self._dm_patient(r.patient_source_id, version.seq),
                "Visit": dmr.render_booking(version),
            }
            return f"Scheduling.{event}", {"Meta": self._meta("Scheduling", event, version, log_id), **body}
        assert isinstance(r, Patient)
        event = "NewPatient" if first else "PatientUpdate"
        body = {"Patient": dmr.render_patient(version)}
        return f"PatientAdmin.{event}", {"Meta": self._meta("PatientAdmin", event, version, log_id), **body}

    def _fhir(self, version: Version, log_id: str) -> tuple[str, dict[str, Any]]:
        r = version.record
        first = version.version_id == 1
        if isinstance(r, Result):
            resource, event = (
                fhir_render.render_observation(version, self.tz),
                "ResultCreated" if first else "ResultUpdated",
            )
        elif isinstance(r, Encounter):
            resource, event = (
                fhir_render.render_encounter(version, self.tz),
                "EncounterCreated" if first else "EncounterUpdated",
            )
        elif isinstance(r, Appointment):
            resource = fhir_render.render_appointment(version, self.tz)
            event = (
                "AppointmentCancelled"
                if r.status == "cancelled"
                else ("AppointmentCreated" if first else "AppointmentUpdated")
            )
        else:
            resource = fhir_render.render_patient(version, self.tz)
            event = "PatientAdminPatientCreated" if first else "PatientAdminPatientUpdated"
        reference = f"{resource['resourceType']}/{resource['id']}"
        header = {
            "resourceType": "MessageHeader",
            "id": log_id,
            "eventUri": EVENT_URI + event,
            "definition": f"https://fhir.redoxengine.com/MessageDefinition/{event}Full",
            "source": {"name": SOURCE["Name"], "endpoint": f"urn:uuid:{SOURCE['ID']}"},
            "focus": [{"reference": reference}],
        }
        bundle = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, log_id)),
            "type": "message",
            "timestamp": fhir_render.fhir_instant(version.last_updated, self.tz),
            "entry": [
                {"fullUrl": f"urn:uuid:{log_id}", "resource": header},
                {"fullUrl": reference, "resource": resource},
            ],
        }
        return f"FHIR:{event}", bundle

    def message(self, version: Version) -> Message:
        log_id = str(uuid.uuid5(uuid.NAMESPACE_OID, f"redox-sandbox-push:{version.seq}"))
        r = version.record
        event, body = self._fhir(version, log_id) if r.surface == "fhir" else self._datamodel(version, log_id)
        return Message(
            log_id, r.surface, version.kind, r.source_id, version.seq, version.version_id, event, body
        )

    # ---- delivery ----------------------------------------------------------------------------

    def _wait(self, attempt: int) -> float:
        return min(self.options.retry_cap, self.options.retry_first * (2 ** max(0, attempt - 1)))

    def verify(self, client: httpx.Client) -> None:
        """Retry the handshake until the destination answers with the challenge."""
        attempt = 0
        while not self._stop.is_set():
            challenge = str(uuid.uuid4())
            try:
                if self.options.verification.upper() == "GET":
                    response = client.get(
                        self.options.url,
                        params={"challenge": challenge, "verification-token": self.options.token},
                    )
                else:
                    response = client.post(
                        self.options.url,
                        json={"verification-token": self.options.token, "challenge": challenge},
                        headers={"application-name": "RedoxEngine"},
                    )
                if response.is_success and challenge in response.text:
                    self.verified = True
                    log.info("push destination verified")
                    return
                log.warning("push verification refused: HTTP %d", response.status_code)
            except httpx.HTTPError as err:
                log.warning("push verification failed: %s", type(err).__name__)
            attempt += 1
            self._stop.wait(self._wait(attempt))

    def _send(self, client: httpx.Client, message: Message, *, redelivery: bool) -> None:
        """Deliver one message, retrying until a 2xx (or stop). Redox pauses the feed meanwhile."""
        attempt = 0
        while not self._stop.is_set():
            body = message.body
            if message.surface == "datamodel":
                # Every try is a new attempt of the same logged message.
                body = {
                    **body,
                    "Meta": {
                        **body["Meta"],
                        "Logs": [{"ID": message.log_id, "AttemptID": str(uuid.uuid4())}],
                    },
                }
            attempt += 1
            try:
                response = client.post(
                    self.options.url,
                    content=json.dumps(body, separators=(",", ":")).encode(),
                    headers={"verification-token": self.options.token, "content-type": "application/json"},
                )
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            if 200 <= status < 300:
                with self._lock:
                    self._ledger.append(
                        {
                            "n": len(self._ledger) + 1,
                            "log_id": message.log_id,
                            "surface": message.surface,
                            "kind": message.kind,
                            "source_id": message.source_id,
                            "seq": message.seq,
                            "version_id": message.version_id,
                            "event": message.event,
                            "redelivery": redelivery,
                            "attempts": attempt,
                        }
                    )
                return
            self.failures += 1
            self._stop.wait(self._wait(attempt))

    def run(self) -> None:
        with httpx.Client(timeout=self.options.timeout) as client:
            self.verify(client)
            while not self._stop.is_set():
                versions = self.store.log(after_seq=self.cursor)
                if not versions:
                    self._stop.wait(0.02)
                    continue
                for version in versions:
                    if self._stop.is_set():
                        return
                    message = self.message(version)
                    self._send(client, message, redelivery=False)
                    self.cursor = version.seq
                    if self.options.redeliver and self._rng.random() < self.options.redeliver:
                        self._send(client, message, redelivery=True)

    def start(self) -> "Pusher":
        self._thread = threading.Thread(target=self.run, name="redox-sandbox-push", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def ledger(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._ledger)

    def status(self) -> dict[str, Any]:
        with self._lock:
            delivered = len(self._ledger)
            redelivered = sum(1 for e in self._ledger if e["redelivery"])
        return {
            "verified": self.verified,
            "delivered": delivered,
            "redelivered": redelivered,
            "failed_attempts": self.failures,
            "cursor_seq": self.cursor,
            "head_seq": self.store.head_seq,
        }
