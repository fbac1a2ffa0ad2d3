"""The `redox-etl` command: one entry point whose sub-commands live beside the code they drive.

Each area exports a typer app and this module only mounts them, so adding a command never means
editing a shared file beyond one line here.
"""

import typer

from sandbox.cli import app as sandbox_app

app = typer.Typer(
    name="redox-etl",
    help="Clinical data from Redox (FHIR R4 + Data Model APIs) into a DuckLake warehouse.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold tokens or patient data
)
app.add_typer(sandbox_app, name="sandbox")


@app.command()
def demo() -> None:
    """Start the embedded sandbox and walk one authenticated FHIR and one Data Model request."""
    from pipelines.demo import run_demo

    run_demo()


if __name__ == "__main__":
    app()
