"""Before a run: is the Redox target there, does it give us a token, do both surfaces answer?

``redox-etl sync``/``backfill``/``demo`` call ``preflight`` before they start Dagster, and
``redox-etl doctor`` runs it alone. Each probe is one cheap request made with retries cut to a few
seconds, so a dead port or a wrong key ends the command in seconds instead of after the client's
minutes of backoff. When the target is the embedded sandbox (REDOX_BASE_URL unset, no explicit
credentials file) and none is running, ``ensure_sandbox`` starts one in the background first.

Invariant: a ``Check`` holds only what is safe to print: the probe's name, the endpoint template,
Redox's own error text (already redacted of what we sent by the client's errors) and the fix. No
secret, token or patient value is ever put in one; the probes' replies are read for success only.
"""

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from typing import Any

from rich.console import Console
from rich.markup import escape

from resources.redox import (
    RedoxAuthError,
    RedoxClient,
    RedoxConfigError,
    RedoxConnectionError,
    RedoxError,
    RedoxRequestError,
    RedoxSettings,
)
from resources.redox.fhir import date_window
from resources.settings import Settings, SettingsError
from sandbox.app import SandboxOptions
from sandbox.server import start_background, status

# Cut from the client's defaults (8 attempts over 5 minutes) so a failure is known in seconds.
PROBE_TUNING: dict[str, Any] = {
    "retry_attempts": 2,
    "retry_timeout": 6.0,
    "connect_timeout": 3.0,
    "read_timeout": 30.0,
}
SANDBOX_START = ".venv/bin/redox-etl sandbox serve --background"


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the commands will pull from, and what is known of the days it holds."""

    base_url: str
    sandbox: bool
    first_day: dt.date | None = None
    last_day: dt.date | None = None


def uses_sandbox(settings: Settings) -> bool:
    """The embedded sandbox is the target unless REDOX_BASE_URL or an explicit credentials file says
    otherwise (a test or benchmark that points at its own sandbox is never second-guessed)."""
    return not settings.base_url and settings.sandbox_credentials is None


def ensure_sandbox(console: Console, settings: Settings, *, patients: int = 1000) -> dict[str, Any] | None:
    """The running sandbox's record, starting one in the background when it is the target and none
    answers; None when the target is not the embedded sandbox."""
    if not uses_sandbox(settings):
        return None
    record = status(settings.sandbox_state)
    if record is not None:
        return record
    console.print(
        f"No Redox sandbox is running: starting one in the background ({patients:,} synthetic patients); "
        "stop it with `.venv/bin/redox-etl sandbox stop`."
    )
    began = time.monotonic()
    record = start_background(SandboxOptions(patients=patients), state_dir=settings.sandbox_state)
    console.print(f"Sandbox at {record['base_url']} after {time.monotonic() - began:.1f} s.")
    return record


def target(settings: Settings) -> Target:
    """The configured target; for a sandbox started here, the clinical days its world holds."""
    if settings.base_url:
        return Target(base_url=settings.base_url, sandbox=False)
    record = status(settings.sandbox_state) if uses_sandbox(settings) else None
    first = record.get("first_day") if record else None
    last = record.get("last_day") if record else None
    return Target(
        base_url=str(record["base_url"])
        if record
        else "the sandbox in " + str(settings.sandbox_credentials_file),
        sandbox=True,
        first_day=dt.date.fromisoformat(first) if first else None,
        last_day=dt.date.fromisoformat(last) if last else None,
    )


def _fix_for(exc: RedoxError, *, sandbox: bool) -> str:
    if isinstance(exc, RedoxConnectionError):
        if sandbox:
            return f"start the sandbox: {SANDBOX_START} (or set REDOX_BASE_URL for real Redox)"
        return "check REDOX_BASE_URL, the network and any proxy between here and Redox"
    if isinstance(exc, RedoxAuthError):
        return (
            "check REDOX_CLIENT_ID, REDOX_KID and the private key (REDOX_PRIVATE_KEY_FILE) against "
            "the Redox dashboard"
        )
    if isinstance(exc, RedoxConfigError):
        return "fix the variable named above (.env.example describes each)"
    if isinstance(exc, RedoxRequestError):
        return exc.hint
    return "see docs/operations.md"


def _said(exc: RedoxError) -> str:
    if isinstance(exc, RedoxRequestError):
        said = exc.server_text or "(no error text in the response)"
        return f"{exc.endpoint} -> HTTP {exc.status}: Redox said: {said}"
    if isinstance(exc, RedoxConnectionError):
        return f"{exc.endpoint}: {exc.cause}"
    return str(exc)


async def _probe(name: str, step: Callable[[], Awaitable[str]], *, sandbox: bool) -> tuple[Check, bool]:
    began = time.monotonic()
    try:
        detail = await step()
    except RedoxError as exc:
        check = Check(name, False, _said(exc), _fix_for(exc, sandbox=sandbox), time.monotonic() - began)
        return check, isinstance(exc, RedoxConnectionError | RedoxAuthError | RedoxConfigError)
    return Check(name, True, detail, seconds=time.monotonic() - began), False


async def _run_probes(redox: RedoxSettings, *, sandbox: bool) -> list[Check]:
    now = dt.datetime.now(dt.UTC)
    window = date_window(now - dt.timedelta(minutes=5), now)
    checks: list[Check] = []
    async with RedoxClient(redox, run_id=None) as client:

        async def token() -> str:
            await client.authorizer("oauth" if redox.keys else redox.datamodel_auth).authorization()
            return f"token from {redox.base_url}"

        async def fhir() -> str:
            pages = client.fhir.search("Encounter", params=window, check_total=False)
            try:
                await anext(pages)
            finally:
                await pages.aclose()
            return "FHIR R4 search answered"

        async def datamodel() -> str:
            await client.datamodel.visit_query(start=now - dt.timedelta(minutes=5), end=now)
            return "Data Model query answered"

        for name, step in (("token", token), ("FHIR API", fhir), ("Data Model API", datamodel)):
            check, fatal = await _probe(name, step, sandbox=sandbox)
            checks.append(check)
            if fatal:
                # Nothing after an unreachable host or a refused key can succeed: say so, not thrice.
                break
    return checks


def preflight(settings: Settings) -> list[Check]:
    """Every probe's outcome, in order; stops at the first that makes the rest pointless."""
    sandbox = not settings.base_url
    began = time.monotonic()
    try:
        redox = RedoxSettings.from_settings(settings, **PROBE_TUNING)
    except (RedoxConfigError, SettingsError) as exc:
        return [
            Check("configuration", False, str(exc), _fix_for(RedoxConfigError(str(exc)), sandbox=sandbox))
        ]
    checks = [Check("configuration", True, f"target {redox.base_url}", seconds=time.monotonic() - began)]
    return checks + asyncio.run(_run_probes(redox, sandbox=sandbox))


def report(console: Console, checks: list[Check]) -> bool:
    """Print one line per check (and what to do for a failed one); True when all passed."""
    for check in checks:
        mark = "[green]ok[/green]  " if check.ok else "[red]FAIL[/red]"
        # Redox's words may hold brackets: printed literally, never read as markup.
        console.print(f"{mark} {escape(check.name)}: {escape(check.detail)}", highlight=False)
        if not check.ok and check.fix:
            console.print(f"      What to do: {escape(check.fix)}", highlight=False)
    return all(check.ok for check in checks)
