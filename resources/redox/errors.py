"""Typed errors for every way a Redox call can fail.

Invariant: an error's message carries the endpoint TEMPLATE (never a concrete URL, query string,
request body or form value), the HTTP status, the server's own words and what to do next. It never
carries PHI or a secret. Server text is passed through ``redact`` with the values the client sent, so
a server that echoes a patient id back in its diagnostics does not leak it into logs or Dagster.
"""

import re
from collections.abc import Iterable, Sequence

_REDACTED = "[redacted]"
# Values shorter than this are too common (e.g. "1", "MR") to redact without mangling the text.
_MIN_REDACT_LEN = 3
_MAX_SERVER_TEXT = 500


def redact(text: str, sent: Iterable[str] = ()) -> str:
    """Remove every value the client sent (ids, names, dates) from ``text``, and clip it.

    Servers sometimes echo a parameter in their diagnostics ("no patient 123456"); the sandbox does
    not, real Redox may. We only know what we sent, so that is what we strip; anything else the
    server volunteers is outside our control (docs/operations.md says so).
    """
    values = sorted({v for v in sent if v and len(v) >= _MIN_REDACT_LEN}, key=len, reverse=True)
    for value in values:
        text = re.sub(re.escape(value), _REDACTED, text, flags=re.IGNORECASE)
    if len(text) > _MAX_SERVER_TEXT:
        text = text[:_MAX_SERVER_TEXT] + "…"
    return text


class RedoxError(Exception):
    """Base of every error the Redox client raises."""


class RedoxConfigError(RedoxError):
    """Settings are missing or unsafe (e.g. a private key file readable by others)."""


class RedoxRequestError(RedoxError):
    """Redox refused a request (4xx). Retrying the same request will not help."""

    hint = "fix the request or configuration; retrying the same call will fail the same way"

    def __init__(self, *, status: int, server_text: str, endpoint: str, hint: str | None = None) -> None:
        self.status = status
        self.server_text = server_text
        self.endpoint = endpoint
        if hint is not None:
            self.hint = hint
        super().__init__(self._message())

    def _message(self) -> str:
        said = self.server_text or "(no error text in the response)"
        return f"{self.endpoint} -> HTTP {self.status}: Redox said: {said}. What to do: {self.hint}"


class RedoxAuthError(RedoxRequestError):
    """Authentication failed even after refreshing the token or rotating keys."""

    hint = (
        "check REDOX_CLIENT_ID, REDOX_KID and the private key against the Redox dashboard "
        "(for legacy auth: REDOX_API_KEY/REDOX_API_SECRET); the secrets themselves are never shown"
    )


class RedoxRateLimited(RedoxRequestError):
    """Redox answered 429 and retries did not get through within the time bound."""

    hint = (
        "the shared budget was slowed down automatically; if this persists, another client on the same "
        "egress IP is spending the budget, or REDOX_RATE_LIMIT is set above Redox's limit"
    )

    def __init__(
        self,
        *,
        status: int,
        server_text: str,
        endpoint: str,
        retry_after: float | None = None,
        limit: int | None = None,
    ) -> None:
        self.retry_after = retry_after
        self.limit = limit
        super().__init__(status=status, server_text=server_text, endpoint=endpoint)


class RedoxServerError(RedoxRequestError):
    """Redox failed (5xx), or the response was unreadable, and retries did not help."""

    hint = "Redox or the network is failing; the call was retried with backoff, try again later"


class RedoxConnectionError(RedoxError):
    """The connection failed or timed out on every attempt."""

    def __init__(self, *, endpoint: str, cause: str) -> None:
        self.endpoint = endpoint
        self.cause = cause
        super().__init__(
            f"{endpoint}: {cause}. What to do: check REDOX_BASE_URL and network reachability; "
            "the call was retried with backoff"
        )


class RedoxDataModelError(RedoxRequestError):
    """A Data Model response carried ``Meta.Errors``: the request failed whatever the HTTP status."""

    hint = (
        "check the destination id (REDOX_DESTINATION_ID_*), the subscriptions for this data model and "
        "the query's fields"
    )

    def __init__(self, *, endpoint: str, texts: Sequence[str], status: int = 200) -> None:
        self.texts = list(texts)
        super().__init__(status=status, server_text="; ".join(self.texts), endpoint=endpoint)


class PageTotalMismatch(RedoxError):
    """A FHIR search returned a different number of entries than its ``Bundle.total`` promised."""

    def __init__(self, *, endpoint: str, total: int, received: int, pages: int) -> None:
        self.endpoint = endpoint
        self.total = total
        self.received = received
        self.pages = pages
        super().__init__(
            f"{endpoint}: Bundle.total said {total} but {pages} page(s) held {received} distinct entries. "
            "What to do: data changed during paging or the server dropped/duplicated a page; rerun the "
            "partition (landing replaces it atomically)"
        )
