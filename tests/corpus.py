"""What the unified tables must hold for each record of the public corpus (../shared/fixtures).

Written from the FHIR R4 and Redox Data Model specifications in plain Python, independently of the
polars normalizers, so a test can route the corpus through any door (the normalizers directly,
``redox-etl load``) and compare, record by record, every value[x], component, code, reference and
timestamp with the column that must hold it.

``expected_fhir(resource)`` and ``expected_datamodel(message)`` return, per table, the rows one
record (or message) must become: dicts of column -> value, each keyed by ``source_id``.
"""

import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any, Final

# The corpus sits beside the repository (CI copies shared/ to ../shared, read-only).
SHARED: Final = Path(os.environ.get("REDOX_ETL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
US_CORE: Final = SHARED / "fixtures" / "us-core"
DATAMODEL: Final = SHARED / "fixtures" / "redox-datamodel"

FHIR_TABLES: Final = {
    "Patient": "patients",
    "Encounter": "encounters",
    "Observation": "results",
    "Appointment": "appointments",
}

_CANONICAL: Final = {
    "loinc": "http://loinc.org",
    "2.16.840.1.113883.6.1": "http://loinc.org",
    "snomed ct": "http://snomed.info/sct",
    "snomed": "http://snomed.info/sct",
    "2.16.840.1.113883.6.96": "http://snomed.info/sct",
    "cpt": "http://www.ama-assn.org/go/cpt",
    "2.16.840.1.113883.6.12": "http://www.ama-assn.org/go/cpt",
}


def require(path: Path) -> Path:
    """``path``, or a clear failure (never a skip) when the shared corpus is not beside the repo."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"corpus not found at {path}: copy the shared fixtures to ../shared beside the repository"
            " (or set REDOX_ETL_SHARED to the folder holding fixtures/)"
        )
    return path


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def fhir_records(table: str) -> list[dict[str, Any]]:
    """Every resource of ``table``'s type in the US Core corpus (Bundles opened), by file order."""
    out = []
    for path in sorted(require(US_CORE).glob("*.json")):
        doc = load(path)
        resources = (
            [e.get("resource") for e in doc.get("entry", [])] if doc["resourceType"] == "Bundle" else [doc]
        )
        out += [r for r in resources if r and FHIR_TABLES.get(r["resourceType"]) == table]
    return out


def canonical(system: str | None) -> str | None:
    if system is None:
        return None
    return _CANONICAL.get(system.strip().lower().removeprefix("urn:oid:"), system)


def utc(text: str | None) -> dt.datetime | None:
    """FHIR dateTime / instant text -> aware UTC (partial dates at the start of their period)."""
    if text is None:
        return None
    if re.fullmatch(r"\d{4}", text):
        text += "-01-01"
    elif re.fullmatch(r"\d{4}-\d{2}", text):
        text += "-01"
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


def ref_id(reference: dict[str, Any] | None, kind: str) -> str | None:
    text = (reference or {}).get("reference") or ""
    match = re.search(rf"(?:^|/){kind}/([^/]+)(?:/_history/[^/]+)?$", text)
    return match.group(1) if match else None


def _coding(cc: dict[str, Any] | None) -> dict[str, Any]:
    cc = cc or {}
    return (cc.get("coding") or [{}])[0]


def observation_values(obj: dict[str, Any]) -> dict[str, Any]:
    """The value columns ``obj`` (an Observation or a component) must fill, by its value[x]."""
    q = obj.get("valueQuantity")
    cc = obj.get("valueCodeableConcept")
    absent = obj.get("dataAbsentReason")
    out: dict[str, Any] = {"value_type": None}
    if q is not None:
        out |= {"value_type": "quantity", "value_num": q.get("value"), "unit": q.get("unit") or q.get("code")}
        out["value_comparator"] = q.get("comparator")
    elif cc is not None:
        coding = _coding(cc)
        out |= {
            "value_type": "codeable_concept",
            "value_code": coding.get("code"),
            "value_code_system": canonical(coding.get("system")),
            "value_code_system_source": coding.get("system"),
            "value_code_display": coding.get("display") or cc.get("text"),
            "value_text": cc.get("text") or coding.get("display"),
        }
    elif "valueString" in obj:
        out |= {"value_type": "string", "value_text": obj["valueString"]}
    elif "valueBoolean" in obj:
        out |= {"value_type": "boolean", "value_text": "true" if obj["valueBoolean"] else "false"}
    elif "valueInteger" in obj:
        out |= {"value_type": "integer", "value_num": float(obj["valueInteger"])}
    elif "valueRange" in obj:
        rng = obj["valueRange"]
        out |= {
            "value_type": "range",
            "value_low": (rng.get("low") or {}).get("value"),
            "value_high": (rng.get("high") or {}).get("value"),
        }
    elif "valueDateTime" in obj:
        out |= {
            "value_type": "datetime",
            "value_text": obj["valueDateTime"],
            "value_at": utc(obj["valueDateTime"]),
        }
    elif "valuePeriod" in obj:
        period = obj["valuePeriod"]
        out |= {
            "value_type": "period",
            "value_at": utc(period.get("start")),
            "value_end_at": utc(period.get("end")),
        }
    elif absent is not None:
        out |= {"value_type": "absent", "absent_reason": _coding(absent).get("code") or absent.get("text")}
    if absent is not None:
        out["absent_reason"] = _coding(absent).get("code") or absent.get("text")
    return out


def _observation_code(obj: dict[str, Any]) -> dict[str, Any]:
    coding = _coding(obj.get("code"))
    return {
        "code": coding.get("code"),
        "code_system": canonical(coding.get("system")),
        "code_system_source": coding.get("system"),
    }


def expected_fhir(resource: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Table -> the rows ``resource`` must become (a record's own row first, then its components)."""
    kind = resource["resourceType"]
    rid = resource["id"]
    if kind == "Observation":
        effective = (
            resource.get("effectiveDateTime")
            or (resource.get("effectivePeriod") or {}).get("start")
            or resource.get("effectiveInstant")
        )
        parent = {
            "source_id": rid,
            "parent_source_id": None,
            "patient_source_id": ref_id(resource.get("subject"), "Patient"),
            "effective_at": utc(effective),
            "member_source_ids": [
                ref_id(m, "Observation") or m.get("reference") for m in resource["hasMember"]
            ]
            if resource.get("hasMember")
            else None,
            **_observation_code(resource),
            **observation_values(resource),
        }
        components = [
            {
                "source_id": f"{rid}/component/{i}",
                "parent_source_id": rid,
                "patient_source_id": parent["patient_source_id"],
                "effective_at": parent["effective_at"],
                **_observation_code(component),
                **observation_values(component),
            }
            for i, component in enumerate(resource.get("component") or [])
        ]
        return {"results": [parent, *components]}
    if kind == "Encounter":
        coding = _coding((resource.get("type") or [None])[0])
        period = resource.get("period") or {}
        return {
            "encounters": [
                {
                    "source_id": rid,
                    "patient_source_id": ref_id(resource.get("subject"), "Patient"),
                    "type_code": coding.get("code"),
                    "type_system": canonical(coding.get("system")),
                    "type_system_source": coding.get("system"),
                    "start_at": utc(period.get("start")),
                    "end_at": utc(period.get("end")),
                }
            ]
        }
    if kind == "Patient":
        return {"patients": [{"source_id": rid, "birth_date": dt.date.fromisoformat(resource["birthDate"])}]}
    if kind == "Appointment":
        return {"appointments": [{"source_id": rid, "start_at": utc(resource.get("start"))}]}
    return {}


# --- Data Model ---------------------------------------------------------------------------------

_DM_VALUE_TYPES: Final = {
    "numeric": "quantity",
    "physicalquantity": "quantity",
    "string": "string",
    "formattedtext": "string",
    "code": "codeable_concept",
    "codedentry": "codeable_concept",
    "datetime": "datetime",
}


def _dm_value(result: dict[str, Any], coded: dict[str, Any] | None) -> dict[str, Any]:
    kind_source = re.sub(r"[\s_-]", "", (result.get("ValueType") or "").lower())
    value = result.get("Value")
    kind = _DM_VALUE_TYPES.get(kind_source, "string") if value not in (None, "") else None
    out: dict[str, Any] = {"value_type": kind}
    if kind == "quantity":
        out["value_num"] = float(value)
        out["unit"] = result.get("Units")
    elif kind == "codeable_concept":
        coded = coded or {}
        system = coded.get("CodeSystem") or coded.get("CodeSystemName")
        out |= {
            "value_code": coded.get("Code") or value,
            "value_code_system": canonical(system),
            "value_code_system_source": system,
            "value_code_display": coded.get("Name") or value,
            "value_text": value,
        }
    elif kind is not None:
        out["value_text"] = value
    return out


def expected_datamodel(message: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Table -> the results rows a Data Model message must become, by the id at the source
    (``local_id``: the key without its patient scope). Results only: that is where values live."""
    rows = []
    for order in message.get("Orders") or []:
        for result in order.get("Results") or []:
            rows.append(
                {
                    "local_id": f"{order.get('ID') or order.get('ApplicationOrderID')}|{result['Code']}",
                    "code": result.get("Code"),
                    "code_system_source": result.get("Codeset"),
                    "code_system": canonical(result.get("Codeset")),
                    "effective_at": utc(
                        result.get("CompletionDateTime")
                        or order.get("CollectionDateTime")
                        or order.get("CompletionDateTime")
                    ),
                    **_dm_value(result, None),
                }
            )
    if (message.get("Meta") or {}).get("DataModel") == "Clinical Summary":
        for panel in message.get("Results") or []:
            for obs in panel.get("Observations") or []:
                system = obs.get("CodeSystem") or obs.get("CodeSystemName")
                rows.append(
                    {
                        "local_id": f"{panel['Code']}|{obs['Code']}|{obs['DateTime']}",
                        "code": obs.get("Code"),
                        "code_system_source": system,
                        "code_system": canonical(system),
                        "effective_at": utc(obs.get("DateTime")),
                        **_dm_value(obs, obs.get("CodedValue")),
                    }
                )
    return {"results": rows} if rows else {}
