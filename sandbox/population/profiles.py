"""Population profiles: how many persons a world holds and how often they meet the organization.

A world's daily volume on each surface is its surface patients (about 0.8 per person, see
people.py) times the per-patient rates below, divided by 90 days. The default rates (no profile)
give the small practice the sandbox has always modeled; ``clinic`` and ``hospital`` set persons and
rates so that one surface's day looks like one real organization's day (docs/sandbox.md gives the
volumes each profile lands, measured, and where the target rates come from).

Invariants:
- the default ``Rates()`` are the rates the world used before profiles existed, and with
  ``orders_per_draw == 1`` the build draws exactly what it drew then: a world without a profile
  is record for record the world it always was;
- a profile fixes the population size; ``PopulationConfig.patients`` is replaced by its persons.
"""

import dataclasses
from typing import Final


@dataclasses.dataclass(frozen=True)
class Rates:
    """Per surface patient per 90 days, except ``orders_per_draw``: lab orders collected together."""

    encounters_per_90d: float = 3.0
    # Lab draws; each draw makes ``orders_per_draw`` orders (panels) at one collection time, and a
    # panel averages about 5 results.
    draws_per_90d: float = 1.5
    orders_per_draw: int = 1
    appointments_per_90d: float = 3.0


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    persons: int
    rates: Rates
    describes: str


DEFAULT_RATES: Final = Rates()

PROFILES: Final = {
    # A multi-physician primary-care practice (~8 physicians, a panel of ~12,000 patients per EHR):
    # ~130 visits and ~130 booked appointments a day, labs drawn at ~30% of visits, two panels each.
    "clinic": Profile(
        "clinic",
        15_000,
        Rates(encounters_per_90d=1.0, draws_per_90d=0.3, orders_per_draw=2, appointments_per_90d=1.0),
        "primary-care practice",
    ),
    # A 250-300 bed community hospital (~60,000 patients a year per EHR): ~500 encounters a day (ED,
    # admissions, observation, outpatient), ~600 lab draws of ~6 panels each (inpatient morning
    # labs, ED and outpatient draws): ~19,000 results a day; ~350 booked appointments a day.
    "hospital": Profile(
        "hospital",
        75_000,
        Rates(encounters_per_90d=0.75, draws_per_90d=0.9, orders_per_draw=6, appointments_per_90d=0.525),
        "community hospital",
    ),
}


def profile(name: str) -> Profile:
    try:
        return PROFILES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None
