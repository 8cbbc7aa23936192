"""Commands of this module are registered on the app by `register` (filled in by its issue)."""

import typer


def register(app: typer.Typer) -> None:
    pass
