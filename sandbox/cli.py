"""`redox-etl sandbox ...`: run the embedded Redox emulator and read its ground truth.

Nothing printed here holds a key, a token or patient data: ``serve`` prints the base URL only (the
secrets go to the 0600 credentials file), ``truth`` prints file names and row counts.
"""

import io
import json
import zipfile
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from sandbox.latency import DEFAULT_MAX_RESPONSE_RECORDS, DEFAULT_ROUND_TRIP_LIMIT

app = typer.Typer(help="The embedded Redox sandbox.", no_args_is_help=True)


# The sandbox stands in for a remote system and reads nothing of the pipeline's configuration: a
# host CLI that mounts this app names the default folder through ``ctx.obj["sandbox_state_dir"]``.
FALLBACK_STATE_DIR = Path(".redox-etl/sandbox")


def _default_state_dir(ctx: typer.Context) -> Path:
    given = (ctx.obj or {}).get("sandbox_state_dir") if isinstance(ctx.obj, dict) else None
    return Path(given) if given else FALLBACK_STATE_DIR.resolve()


def _rate_limit(text: str) -> tuple[int, float] | None:
    if text.strip().lower() in ("off", "none", "0"):
        return None
    count, sep, seconds = text.partition("/")
    try:
        limit, window = int(count), float(seconds) if sep else 300.0
    except ValueError:
        raise typer.BadParameter("use N/SECONDS, e.g. 7500/300, or 'off'") from None
    if limit <= 0 or window <= 0:
        raise typer.BadParameter("N and SECONDS must be positive")
    return limit, window


def _push_retry(text: str) -> tuple[float, float]:
    try:
        first, cap = (float(part) for part in text.split(":"))
    except ValueError:
        raise typer.BadParameter("--push-retry is FIRST:CAP in seconds, e.g. 5:90") from None
    if not 0 < first <= cap:
        raise typer.BadParameter("--push-retry needs 0 < FIRST <= CAP")
    return first, cap


def _day(value: datetime | None) -> date | None:
    return value.date() if value else None


Seed = Annotated[int, typer.Option(help="Seed for the population and the fault mix.")]
Patients = Annotated[int, typer.Option(help="Number of people in the synthetic population.")]
Start = Annotated[datetime | None, typer.Option(formats=["%Y-%m-%d"], help="First clinical day.")]
End = Annotated[datetime | None, typer.Option(formats=["%Y-%m-%d"], help="Last clinical day.")]
StateDir = Annotated[
    Path | None, typer.Option(help="Where credentials.json goes (default: $REDOX_ETL_HOME/sandbox).")
]
FhirTz = Annotated[str, typer.Option(help="The FHIR EHR's time zone (its timestamps carry this offset).")]
Profile = Annotated[
    str | None,
    typer.Option(help="Population profile: clinic or hospital (sets the persons; --patients is ignored)."),
]


def _check_profile(profile: str | None) -> str | None:
    from sandbox.population.profiles import PROFILES

    if profile is None:
        return None
    if profile.strip().lower() not in PROFILES:
        raise typer.BadParameter(f"--profile must be one of {', '.join(PROFILES)}")
    return profile.strip().lower()


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; 0 picks any free port.")] = 0,
    seed: Seed = 7,
    patients: Patients = 1000,
    start: Start = None,
    end: End = None,
    rate_limit: Annotated[
        str, typer.Option("--rate-limit", help="Requests per rolling window per IP: N/SECONDS, or 'off'.")
    ] = "7500/300",
    faults: Annotated[
        str | None, typer.Option(help="Fault mix, e.g. 5xx=0.03,timeout=0.01,429=0.01,dup=0.01,slow=0.05:2s.")
    ] = None,
    token_ttl: Annotated[int, typer.Option(help="Access token lifetime in seconds.")] = 300,
    retry_after: Annotated[bool, typer.Option("--retry-after", help="Send Retry-After with 429s.")] = False,
    state_dir: StateDir = None,
    org: Annotated[str, typer.Option(help="FHIR destination slug in the URL.")] = "redox-fhir-sandbox",
    environment: Annotated[str, typer.Option(help="FHIR environment flag in the URL.")] = "Development",
    fhir_tz: FhirTz = "America/New_York",
    background: Annotated[
        bool,
        typer.Option("--background", help="Keep serving after this command returns (stop: sandbox stop)."),
    ] = False,
    push_to: Annotated[
        str | None, typer.Option(help="Subscribe this destination URL: verify it, then push every change.")
    ] = None,
    verification_token: Annotated[
        str | None, typer.Option(help="The destination's verification token (sent on every delivery).")
    ] = None,
    push_verification: Annotated[str, typer.Option(help="Verification method: POST or GET.")] = "POST",
    push_retry: Annotated[
        str,
        typer.Option(
            help="Back-off after a failed delivery: FIRST:CAP seconds (Redox: a few s up to 1-2 min)."
        ),
    ] = "5:90",
    push_redeliver: Annotated[
        float, typer.Option(help="Probability of re-sending an acknowledged message (at-least-once).")
    ] = 0.0,
    profile: Profile = None,
    latency: Annotated[
        str,
        typer.Option(
            help="Answer latency: none, realistic, or e.g. fhir=400ms/3s,datamodel=1500ms/10s,record=5ms "
            "(P50/P99 per endpoint kind)."
        ),
    ] = "none",
    max_response_records: Annotated[
        int,
        typer.Option(min=1, help="A Data Model answer holding more records than this is refused with 413."),
    ] = DEFAULT_MAX_RESPONSE_RECORDS,
    round_trip_limit: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Seconds a Data Model round trip may take (latency + per-record cost); longer: 504.",
        ),
    ] = DEFAULT_ROUND_TRIP_LIMIT,
) -> None:
    """Start the sandbox; write <state-dir>/credentials.json (0600) and print the base URL."""
    from sandbox.app import ENVIRONMENTS, SandboxOptions
    from sandbox.faults import FaultSpec
    from sandbox.latency import LatencySpec
    from sandbox.server import serve_forever, start_background
    from sandbox.server import status as server_status

    if environment not in ENVIRONMENTS:
        raise typer.BadParameter(f"environment must be one of {', '.join(ENVIRONMENTS)}")
    try:
        FaultSpec.parse(faults)
        LatencySpec.parse(latency)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    options = SandboxOptions(
        seed=seed,
        patients=patients,
        start=_day(start),
        end=_day(end),
        rate_limit=_rate_limit(rate_limit),
        faults=faults,
        token_ttl=token_ttl,
        retry_after=retry_after,
        org=org,
        environment=environment,
        fhir_tz=fhir_tz,
        push_to=push_to,
        push_token=verification_token,
        push_verification=push_verification.upper(),
        push_retry=_push_retry(push_retry),
        push_redeliver=push_redeliver,
        profile=_check_profile(profile),
        latency=latency,
        max_response_records=max_response_records,
        round_trip_limit=round_trip_limit,
    )
    if push_to and not verification_token:
        raise typer.BadParameter("--push-to needs --verification-token (the destination's token)")
    folder = state_dir or _default_state_dir(ctx)
    running = server_status(folder)
    if running is not None:
        # Two servers would fight over one credentials file; the second would strand the first.
        typer.echo(
            f"A sandbox is already running at {running['base_url']} (pid {running['pid']}); "
            "stop it first: redox-etl sandbox stop",
            err=True,
        )
        raise typer.Exit(1)
    if background:
        who = f"the {options.profile} profile" if options.profile else f"{patients:,} synthetic patients"
        typer.echo(f"Starting the Redox sandbox ({who}) in the background...")
        record = start_background(options, state_dir=folder, host=host, port=port)
        typer.echo(_describe(record, folder))
        return
    serve_forever(
        options,
        host=host,
        port=port,
        state_dir=folder,
        announce=lambda line: typer.echo(line, err=False),
    )


def _describe(record: dict[str, Any], folder: Path) -> str:
    days = f", clinical days {record['first_day']}..{record['last_day']}" if record.get("first_day") else ""
    return (
        f"Redox sandbox running at {record['base_url']} (pid {record['pid']}, "
        f"{record.get('patients', 0):,} patients{days}); credentials in {folder / 'credentials.json'}"
    )


@app.command()
def status(
    ctx: typer.Context,
    state_dir: StateDir = None,
) -> None:
    """Say whether a sandbox is running (pid, URL, days it holds); exit 1 if none is."""
    from sandbox.server import status as server_status

    folder = state_dir or _default_state_dir(ctx)
    record = server_status(folder)
    if record is None:
        typer.echo("No sandbox running. Start one: redox-etl sandbox serve --background")
        raise typer.Exit(1)
    typer.echo(_describe(record, folder))


@app.command()
def stop(
    ctx: typer.Context,
    state_dir: StateDir = None,
) -> None:
    """Stop the sandbox started with `serve --background` (or any serve using this state folder)."""
    from sandbox.server import stop as server_stop

    record = server_stop(state_dir or _default_state_dir(ctx))
    if record is None:
        typer.echo("No sandbox was running.")
        return
    typer.echo(f"Stopped the sandbox at {record['base_url']} (pid {record['pid']}).")


def _fetch_truth(base_url: str) -> dict[str, bytes]:
    import httpx

    response = httpx.get(f"{base_url.rstrip('/')}/sandbox/truth", timeout=300)
    response.raise_for_status()
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _running_base_url(state_dir: Path) -> str | None:
    import httpx

    path = state_dir / "credentials.json"
    if not path.exists():
        return None
    base_url = str(json.loads(path.read_text())["base_url"])
    try:
        httpx.get(f"{base_url}/sandbox/health", timeout=2).raise_for_status()
    except httpx.HTTPError:
        return None
    return base_url


@app.command()
def truth(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder for the Parquet files.")],
    url: Annotated[str | None, typer.Option(help="Base URL of a running sandbox.")] = None,
    build: Annotated[bool, typer.Option("--build", help="Build the world locally even if one runs.")] = False,
    seed: Seed = 7,
    patients: Patients = 1000,
    start: Start = None,
    end: End = None,
    state_dir: StateDir = None,
    fhir_tz: FhirTz = "America/New_York",
    profile: Profile = None,
) -> None:
    """Write the ground truth as Parquet: from a running sandbox, or built from the same options."""
    out.mkdir(parents=True, exist_ok=True)
    base_url = url or (None if build else _running_base_url(state_dir or _default_state_dir(ctx)))
    files: dict[str, Any]
    if base_url:
        files = _fetch_truth(base_url)
        for name, payload in files.items():
            (out / Path(name).name).write_bytes(payload)
        typer.echo(f"Wrote {len(files)} truth files from {base_url} to {out}")
        return
    from sandbox.app import SandboxOptions
    from sandbox.server import build_world

    world = build_world(
        SandboxOptions(
            seed=seed,
            patients=patients,
            start=_day(start),
            end=_day(end),
            fhir_tz=fhir_tz,
            profile=_check_profile(profile),
        )
    )
    frames = world.truth()
    for name, frame in frames.items():
        frame.write_parquet(out / f"{name}.parquet")
        typer.echo(f"{name}.parquet: {frame.height} rows")
