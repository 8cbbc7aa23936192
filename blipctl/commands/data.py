"""`blipctl data ...`: make and convert datasets (filled in by the data-layer work)."""

import typer

app = typer.Typer(
    help="Make and convert datasets: the synthetic demo world, annotation JSON to shards.", no_args_is_help=True
)
