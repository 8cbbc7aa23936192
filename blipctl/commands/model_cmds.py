"""Model commands: caption, score, export."""

import typer


def register(app: typer.Typer) -> None:
    pass
