"""The polars dtypes of the Data Model response parts this package reads.

Each dtype names only the fields some normalizer turns into a column or a check; the decoder reads
nothing else, and what it skips stays reachable from SQL through the record's source JSON.

Invariant: every leaf is ``String``. Values are parsed (numbers, datetimes) by the normalizers,
where a bad one becomes a quarantine reason naming its field and the record's other values stay
readable.
"""

from typing import Final

import polars as pl

from transforms import common

S = pl.String()
# The fields ``repair`` adds to a container it had to rewrite: the reason and the original JSON.
MARK: Final = {common.RECORD_ERROR: S, common.RECORD_RAW: S}

IDENTIFIERS: Final = pl.List(pl.Struct({"ID": S, "IDType": S}))
# A patient that only says whose record this is (a visit's, an order's, a header's).
PATIENT_CTX: Final = pl.Struct({"Identifiers": IDENTIFIERS})
PATIENT: Final = pl.Struct(
    {
        "Identifiers": IDENTIFIERS,
        "Demographics": pl.Struct(
            {
                "FirstName": S,
                "MiddleName": S,
                "LastName": S,
                "DOB": S,
                "SSN": S,
                "Sex": S,
                "PhoneNumber": pl.Struct({"Home": S, "Mobile": S, "Office": S}),
                "EmailAddresses": pl.List(S),
                "Address": pl.Struct({"StreetAddress": S, "City": S, "State": S, "ZIP": S}),
            }
        ),
    }
)
PROVIDER: Final = pl.Struct({"ID": S, "IDType": S, "NPI": S, "FirstName": S, "LastName": S})
VISIT: Final = pl.Struct(
    {
        "VisitNumber": S,
        "VisitDateTime": S,
        "DischargeDateTime": S,
        "Duration": S,
        "PatientClass": S,
        "Status": S,
        "Reason": S,
        "Type": S,
        "LastUpdated": S,
        "AttendingProvider": PROVIDER,
        "Location": pl.Struct({"Facility": S, "Department": S}),
        "AppointmentInfo": pl.List(pl.Struct({"Code": S, "Codeset": S, "Description": S})),
    }
)
RANGE: Final = pl.Struct({"Low": S, "High": S, "Text": S})
ORDER: Final = pl.Struct(
    {
        "ID": S,
        "ApplicationOrderID": S,
        "TransactionDateTime": S,
        "LastUpdated": S,
        "CollectionDateTime": S,
        "CompletionDateTime": S,
    }
)
RESULT: Final = pl.Struct(
    {
        "Code": S,
        "Codeset": S,
        "Description": S,
        "Value": S,
        "ValueType": S,
        "Units": S,
        "AbnormalFlag": S,
        "Status": S,
        "CompletionDateTime": S,
        "ReferenceRange": RANGE,
    }
)
CS_ENCOUNTER: Final = pl.Struct(
    {
        "Identifiers": IDENTIFIERS,
        "Type": pl.Struct({"Code": S, "CodeSystem": S, "CodeSystemName": S, "Name": S}),
        "DateTime": S,
        "EndDateTime": S,
        "Providers": pl.List(PROVIDER),
        "Locations": pl.List(pl.Struct({"Name": S})),
        "ReasonForVisit": pl.List(pl.Struct({"Code": S, "Name": S})),
    }
)
CS_RESULT: Final = pl.Struct({"Code": S, "CodeSystem": S, "CodeSystemName": S, "Name": S})
CS_OBSERVATION: Final = pl.Struct(
    {
        "Code": S,
        "CodeSystem": S,
        "CodeSystemName": S,
        "Name": S,
        "CodedValue": pl.Struct({"Code": S, "CodeSystem": S, "CodeSystemName": S, "Name": S}),
        "Status": S,
        "Interpretation": S,
        "DateTime": S,
        "Value": S,
        "ValueType": S,
        "Units": S,
        "ReferenceRange": RANGE,
    }
)
META: Final = pl.Struct(
    {"DataModel": S, "EventType": S, "EventDateTime": S, "Errors": pl.List(pl.Struct({"Text": S}))}
)

# Scheduling BookedResponse and Results replies put the record's patient inside the record.
VISIT_WITH_PATIENT: Final = pl.Struct({**{f.name: f.dtype for f in VISIT.fields}, "Patient": PATIENT_CTX})
ORDER_WITH_PATIENT: Final = pl.Struct({**{f.name: f.dtype for f in ORDER.fields}, "Patient": PATIENT_CTX})
