"""The sandbox's canonical records: what each emulated EHR holds, before any surface renders it.

The population generator (sandbox/population/) makes these; the HTTP surfaces render them as FHIR
R4 resources (sandbox/fhir_render.py) or Redox Data Model payloads (sandbox/datamodel_render.py);
the truth endpoint exports them. Field values use the warehouse's canonical vocabularies (see
docs/data-dictionary.md: sex 'male'/'female'/..., appointment status 'booked'/'cancelled'/..., and
so on), so that truth is directly comparable with what the pipeline loads. Each surface renderer owns
the mapping from canonical value to its own wire code.

Invariants:
- every datetime here is timezone-aware UTC; a surface that shows local time converts on render;
- ``source_id`` is unique within (surface, kind); ``patient_source_id`` names a ``Patient`` of the
  same surface;
- records are immutable versions: a change makes a new version with a higher ``seq`` and a later
  ``last_updated`` (see sandbox/store.py). The sandbox never imports the pipeline's packages.
"""

import dataclasses
from collections.abc import Callable
from datetime import date, datetime
from typing import Any, Literal, TypeVar

Surface = Literal["fhir", "datamodel"]
Kind = Literal["patients", "encounters", "results", "appointments"]
KINDS: tuple[Kind, ...] = ("patients", "encounters", "results", "appointments")


@dataclasses.dataclass(frozen=True, slots=True)
class Identifier:
    """A patient identifier. ``system`` is a URI (``urn:oid:...`` or an http URL) on every surface;
    the Data Model renderer writes the OID form's bare OID, or a short IDType such as 'MR', as
    ``IDType``."""

    system: str
    value: str


@dataclasses.dataclass(frozen=True, slots=True)
class Person:
    """A real human in the synthetic world: ground truth only, never served."""

    person_id: str
    given_name: str
    middle_name: str | None
    family_name: str
    birth_date: date
    sex: str
    ssn: str | None
    address_line: str
    address_city: str
    address_state: str
    address_postal_code: str
    phone: str | None
    email: str | None
    # Ground-truth relations that make matching hard: 'twin', 'same-name-dob', 'household'.
    hard_group: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Patient:
    """One EHR's record of a person, with whatever noise that EHR introduced."""

    surface: Surface
    source_id: str
    person_id: str
    identifiers: tuple[Identifier, ...]
    given_name: str | None
    middle_name: str | None
    family_name: str | None
    birth_date: date | None
    sex: str | None
    ssn: str | None
    address_line: str | None
    address_city: str | None
    address_state: str | None
    address_postal_code: str | None
    phone: str | None
    email: str | None
    # Which kinds of noise were applied (e.g. 'nickname', 'typo', 'dob-swap'), for test diagnostics.
    noise: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Encounter:
    surface: Surface
    source_id: str
    patient_source_id: str
    encounter_class: str
    type_code: str | None
    type_system: str | None
    type_display: str | None
    status: str
    start_at: datetime
    end_at: datetime | None
    location: str | None
    attending_provider_id: str | None
    attending_provider_name: str | None
    reason: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    surface: Surface
    source_id: str
    patient_source_id: str
    order_id: str
    code: str
    code_system: str
    display: str
    value_num: float | None
    value_text: str | None
    unit: str | None
    reference_low: float | None
    reference_high: float | None
    reference_text: str | None
    abnormal_flag: str | None
    status: str
    effective_at: datetime
    # How the value is sent, in the warehouse's words (results.value_type): 'quantity', 'string',
    # 'codeable_concept', 'boolean', or None for a panel whose values are its components.
    value_type: str | None = None
    value_code: str | None = None
    value_code_system: str | None = None
    value_code_display: str | None = None
    # A panel's parts (FHIR Observation.component): dicts of code, display, value_num, unit.
    components: list[dict[str, Any]] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Appointment:
    surface: Surface
    source_id: str
    patient_source_id: str
    status: str
    start_at: datetime
    end_at: datetime
    duration_min: int
    type_code: str | None
    type_display: str | None
    location: str | None
    provider_id: str | None
    provider_name: str | None
    reason: str | None


Record = Patient | Encounter | Result | Appointment

# How a FHIR encounter names its attending provider, one of the standard reference forms real EHRs
# send: a logical reference (NPI identifier) typed ATND, a conditional reference
# ('Practitioner?identifier=<npi system>|<npi>') typed PPRF, or a display-only name typed ATND.
ProviderForm = Literal["logical", "conditional", "display"]


def provider_form(encounter_source_id: str) -> ProviderForm:
    """The reference form an encounter's provider is sent in: fixed per encounter (a stable digest
    of its id, not a random draw), so the renderer and the truth agree without a stored field."""
    digest = sum(encounter_source_id.encode()) % 6
    return "conditional" if digest < 2 else "display" if digest == 2 else "logical"


@dataclasses.dataclass(frozen=True, slots=True)
class Version:
    """One stored version of a record: what the store keeps and every query returns."""

    kind: Kind
    record: Record
    seq: int
    last_updated: datetime
    version_id: int = 1


_T = TypeVar("_T")


def bulk_constructor(cls: type[_T]) -> Callable[..., _T]:
    """A positional constructor for the frozen slots dataclass ``cls`` that makes the same objects
    as ``cls(*fields)``, several times faster: for building a world's few hundred thousand records.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__`` (about 2 us a
    record). An unfrozen twin with the very same slots sets them with plain attribute stores and
    then becomes ``cls`` by ``__class__`` assignment, which Python allows because the two layouts
    are identical. The result is an ordinary, still frozen ``cls`` instance.
    """
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if getattr(cls, "__slots__", None) != tuple(f.name for f in fields) or hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} is not a plain slots dataclass")

    def become(self: Any) -> None:
        self.__class__ = cls

    twin = dataclasses.make_dataclass(
        f"_{cls.__name__}Builder",
        [(f.name, f.type) for f in fields],
        slots=True,
        namespace={"__post_init__": become},
    )
    return twin
