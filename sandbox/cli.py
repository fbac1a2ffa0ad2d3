"""`redox-etl sandbox ...`: run the embedded Redox emulator and read its ground truth."""

import typer

app = typer.Typer(help="The embedded Redox sandbox.", no_args_is_help=True)
