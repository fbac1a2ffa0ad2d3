"""Embedded patients carried forward from the transport's parse of a Data Model reply.

Every clinical response (VisitQuery, Results.Query, Scheduling.Booked reply) embeds its patients.
The extract holds each reply already parsed (the client reads ``Meta.Errors`` from it); typing that
parse here into the patients page dtype, and landing it beside the page, lets the patients extract
and the patients load read a clinical page's patients without decoding the page a second and a
third time. ``locate.decode`` takes a page's ``CARRIED`` value in place of decoding its body.

Invariant: a carried value equals what ``common.robust_decode`` makes of the same body with
``chains.page_dtype("patients")``, or there is none (null) and the body is decoded as before. So
only a page every value of which polars would read unchanged is carried: strings, and integers and
booleans where a string is read (json_decode prints them as JSON does). A float (printed in
polars' own way), a value of the wrong shape or a page that is not an object is left to the decode
and its repair, which alone decide markers and reasons.
"""

from collections.abc import Sequence
from typing import Any, Final

import polars as pl

from transforms.common import DType
from transforms.datamodel.chains import page_dtype

# The column a landed page's carried value travels in, next to ``raw_ref`` and ``body``.
CARRIED: Final = "_carried"
CARRIED_DTYPE: Final = page_dtype("patients")
_I64: Final = 2**63


class _NotCarried(Exception):
    """A value polars would not read unchanged: the page is decoded instead."""


def _typed(value: Any, dtype: DType) -> Any:
    if value is None:
        return None
    if isinstance(dtype, pl.Struct):
        if not isinstance(value, dict):
            raise _NotCarried
        # Keys the dtype does not name are dropped, as json_decode drops them.
        return {f.name: _typed(value.get(f.name), f.dtype) for f in dtype.fields}
    if isinstance(dtype, pl.List):
        if not isinstance(value, list):
            raise _NotCarried
        return [_typed(item, dtype.inner) for item in value]
    if dtype != pl.String:
        raise _NotCarried
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and -_I64 <= value < _I64:
        return str(value)
    raise _NotCarried


def carried_patients(parsed: Sequence[Any]) -> pl.Series:
    """One value per parsed reply, in order: the page typed for the patients decode, or null where
    the page must be decoded from its body."""
    values = []
    for page in parsed:
        try:
            values.append(_typed(page, CARRIED_DTYPE) if isinstance(page, dict) else None)
        except _NotCarried:
            values.append(None)
    return pl.Series(CARRIED, values, dtype=CARRIED_DTYPE)
