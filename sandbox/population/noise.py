"""Demographic noise between a person's two patient copies: which kinds a person can get, how many
and which are drawn, and how each one edits a copy (typos, nicknames, married names, moves, ...).

Invariant: kinds are applied in ``NOISE_KINDS`` order, and a copy that gets noise still reads as the
same person to a human (a new name at a new address keeps birth date and SSN).
"""

import random
from datetime import date
from typing import Final

from sandbox import names
from sandbox.population.pools import SIMPLE_FAMILY

# Noise kinds in the order they are applied to a copy (a married name is typo'd, not the reverse).
NOISE_KINDS: Final = (
    "hyphenated",
    "married-name",
    "nickname",
    "typo",
    "name-swap",
    "dob-swap",
    "missing-ssn",
    "ssn-digit",
    "moved",
    "missing-phone",
    "missing-email",
)
_NOISE_WEIGHTS: Final[dict[str, float]] = {
    # Relative weights among the kinds a person is eligible for (a hyphenated-name variant needs a
    # compound name, a married name an adult woman, a day/month swap a day <= 12), so rarely
    # eligible kinds weigh more to show up at all in a small world.
    "hyphenated": 25,
    "married-name": 12,
    "nickname": 12,
    "typo": 15,
    "name-swap": 4,
    "dob-swap": 10,
    "missing-ssn": 9,
    "ssn-digit": 5,
    "moved": 12,
    "missing-phone": 9,
    "missing-email": 9,
}
# How many kinds a copy pair without a shared enterprise id gets: mostly 0-2.
_NOISE_COUNTS: Final = ((0, 0.30), (1, 0.45), (2, 0.20), (3, 0.05))
# Enterprise-linked pairs still drift a little (people move), but the link does not depend on it.
_P_LINKED_NOISE: Final = 0.15
_LINKED_KINDS: Final = ("moved", "missing-phone", "missing-email", "typo")


_LETTERS: Final = "abcdefghijklmnopqrstuvwxyz"


def new_address(rng: random.Random) -> tuple[str, str, str, str]:
    city, state, zip3, _ = rng.choice(names.CITIES)
    line = f"{rng.randint(1, 9999)} {rng.choice(names.STREET_NAMES)} {rng.choice(names.STREET_SUFFIXES)}"
    if rng.random() < 0.12:
        line += f" Apt {rng.randint(1, 40)}"
    return line, city, state, f"{zip3}{rng.randrange(100):02d}"


def _typo(rng: random.Random, s: str) -> str:
    """One keyboard slip, never on the first letter (clerks rarely get that wrong)."""
    if len(s) < 3:
        return s + rng.choice(_LETTERS)
    i = rng.randrange(1, len(s))
    op = rng.random()
    if op < 0.25 and s[i - 1] != s[i]:
        return s[: i - 1] + s[i] + s[i - 1] + s[i + 1 :]
    if op < 0.5 and len(s) > 3:
        return s[:i] + s[i + 1 :]
    if op < 0.7:
        return s[:i] + rng.choice(_LETTERS) + s[i:]
    choices = _LETTERS.replace(s[i].lower(), "")
    return s[:i] + rng.choice(choices) + s[i + 1 :]


def _eligible(kind: str, c: dict[str, object], today: date) -> bool:
    family = c["family_name"]
    assert isinstance(family, str)
    if kind == "nickname":
        return c["given_name"] in names.NICKNAMES
    if kind == "dob-swap":
        b = c["birth_date"]
        assert isinstance(b, date)
        return b.day <= 12 and b.day != b.month
    if kind in ("missing-ssn", "ssn-digit"):
        return c["ssn"] is not None
    if kind == "married-name":
        b = c["birth_date"]
        assert isinstance(b, date)
        return c["sex"] == "female" and (today - b).days > 20 * 365 and "-" not in family
    if kind == "hyphenated":
        return "-" in family or " " in family
    if kind == "missing-phone":
        return c["phone"] is not None
    if kind == "missing-email":
        return c["email"] is not None
    return True


def apply_noise(rng: random.Random, kind: str, copy: dict[str, object]) -> bool:
    """Apply one noise kind to a patient copy in place; False when it does not apply to this copy."""
    if kind == "hyphenated":
        family = str(copy["family_name"])
        parts = family.replace("-", " ").split()
        roll = rng.random()
        if "-" in family:
            copy["family_name"] = parts[0] if roll < 0.6 else (parts[-1] if roll < 0.8 else " ".join(parts))
        else:
            copy["family_name"] = "".join(parts) if roll < 0.6 else parts[-1]
    elif kind == "married-name":
        new = rng.choice(SIMPLE_FAMILY)
        copy["family_name"] = f"{copy['family_name']}-{new}" if rng.random() < 0.5 else new
    elif kind == "nickname":
        given = copy["given_name"]
        if given not in names.NICKNAMES:
            return False
        copy["given_name"] = rng.choice(names.NICKNAMES[str(given)])
    elif kind == "typo":
        field = "family_name" if rng.random() < 0.5 else "given_name"
        copy[field] = _typo(rng, str(copy[field]))
    elif kind == "name-swap":
        copy["given_name"], copy["family_name"] = copy["family_name"], copy["given_name"]
    elif kind == "dob-swap":
        b = copy["birth_date"]
        assert isinstance(b, date)
        copy["birth_date"] = date(b.year, b.day, b.month)
    elif kind == "missing-ssn":
        if copy["ssn"] is None:
            return False
        copy["ssn"] = None
    elif kind == "ssn-digit":
        ssn = copy["ssn"]
        if ssn is None:
            return False
        chars = list(str(ssn))
        # Keep the 9xx area so the value stays in the never-issued range.
        pos = rng.choice((4, 5, 7, 8, 9, 10))
        chars[pos] = rng.choice("0123456789".replace(chars[pos], ""))
        copy["ssn"] = "".join(chars)
    elif kind == "moved":
        line, city, state, postal = new_address(rng)
        if rng.random() < 0.4:  # moved within town
            city, state = str(copy["address_city"]), str(copy["address_state"])
            postal = str(copy["address_postal_code"])[:3] + postal[3:]
        copy["address_line"], copy["address_city"] = line, city
        copy["address_state"], copy["address_postal_code"] = state, postal
    elif kind == "missing-phone":
        if copy["phone"] is None:
            return False
        copy["phone"] = None
    elif kind == "missing-email":
        if copy["email"] is None:
            return False
        copy["email"] = None
    return True


def draw_noise(rng: random.Random, canonical: dict[str, object], linked: bool, today: date) -> list[str]:
    if linked:
        return [rng.choice(_LINKED_KINDS)] if rng.random() < _P_LINKED_NOISE else []
    counts, weights = zip(*_NOISE_COUNTS, strict=True)
    k = rng.choices(counts, weights)[0]
    pool = [kind for kind in NOISE_KINDS if _eligible(kind, canonical, today)]
    chosen: list[str] = []
    while pool and len(chosen) < k:
        pick = rng.choices(pool, [_NOISE_WEIGHTS[p] for p in pool])[0]
        chosen.append(pick)
        pool.remove(pick)
    if "married-name" in chosen and "hyphenated" in chosen:
        chosen.remove("married-name")
    # A human must still see one person: a new name at a new address keeps birth date and SSN.
    if {"married-name", "moved"} <= set(chosen) and len(chosen) > 2:
        chosen = [c for c in chosen if c in ("married-name", "moved")]
    return sorted(chosen, key=NOISE_KINDS.index)
