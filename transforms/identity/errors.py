"""The errors identity raises and the rule their messages keep.

Invariant: an ``IdentityError`` message never holds a value from a patient record (name, birth date,
identifier, address, SSN): it names columns, comparisons, rules and counts only, so it may be shown
to a user, logged, or put into Dagster metadata as it is.
"""


class IdentityError(RuntimeError):
    """Identity cannot go on: an engine failure or an input it cannot link; the message says which
    (and what to do) without any record value."""
