"""The sandbox's synthetic population: persons, their records on two EHR surfaces, and the ground
truth. A seeded generator makes ``Person`` s (the truth), gives each a ``Patient`` record on the
FHIR surface, the Data Model surface or both (with realistic demographic noise between the two
copies), fills both EHRs with encounters, lab results and appointments, and writes every record to
a ``Store``; ``World.advance`` then moves the clock and lets things happen.

Modules, in the order they build on each other:
- ``ids``: identifier systems and the keyed id maps (MRNs, visit/order numbers, SSNs, NPIs);
- ``pools``, ``draws``, ``epoch``: name pools, seeded random draws, epoch-second times;
- ``noise``: demographic noise between a person's two copies;
- ``people``: persons, hard groups and their patient copies; the identity benchmark's frame;
- ``clinic``: encounters, lab results and appointments in batches;
- ``records``: batch frames to ``sandbox.model`` records;
- ``truth``: the ground-truth frames, named and typed like the unified tables;
- ``world``: ``PopulationConfig``, ``World`` (the store and its clock) and ``build``.

Invariant: the same ``PopulationConfig`` gives the same world, byte for byte; every datetime is
aware UTC at whole seconds; ``person_id`` links a person's copies and is never served. This package
re-exports the names other code imports; nothing here imports the pipeline.
"""

from sandbox.population.ids import DM_EHRID, DM_MRN, ENTERPRISE, ENTERPRISE_OID, FHIR_MRN, SURFACES
from sandbox.population.noise import NOISE_KINDS
from sandbox.population.people import HARD_GROUPS, generate_patient_frame
from sandbox.population.world import CHANGE_KINDS, PopulationConfig, World, build

__all__ = [
    "CHANGE_KINDS",
    "DM_EHRID",
    "DM_MRN",
    "ENTERPRISE",
    "ENTERPRISE_OID",
    "FHIR_MRN",
    "HARD_GROUPS",
    "NOISE_KINDS",
    "SURFACES",
    "PopulationConfig",
    "World",
    "build",
    "generate_patient_frame",
]
