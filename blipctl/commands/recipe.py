"""`blipctl run RECIPE.toml`: run a chain of steps (data, pre-training, fine-tunes, CapFilt, evaluation)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer

from blipctl._common import err, guarded


def run(
    recipe: Annotated[Path, typer.Argument(help="A recipe TOML file (see recipes/).")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="STEP.KEY=VALUE overrides, e.g. pretrain_a.max_steps=10 recipe.out=runs/x"),
    ] = None,
    from_step: Annotated[str | None, typer.Option("--from", help="Rerun this step and every later one.")] = None,
    only: Annotated[str | None, typer.Option("--only", help="Run just this step.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the plan; run nothing.")] = False,
) -> None:
    r"""Run a recipe: every [\[step]] is a blipctl command run in this process, in order.

    Finished steps are skipped, so rerunning a finished recipe does nothing; a changed step reruns with
    everything after it that depends on it. A failed step stops the run and leaves earlier outputs intact.

    Examples:

      blipctl run recipes/demo.toml

      blipctl run recipes/demo.toml --from capfilt

      blipctl run recipes/demo.toml recipe.out=runs/small data.scale=small
    """
    from blipctl.recipe import load_recipe, plan, run_recipe

    r = load_recipe(recipe, overrides)
    if dry_run:
        for st, done in plan(r):
            state = "[green]done[/]" if done else "[yellow]to run[/]"
            err.print(f"{state}  [bold]{st.name}[/] (blipctl {st.command}) -> {st.out}", highlight=False)
        return

    def event(kind: str, st, info: dict) -> None:
        if kind == "skip":
            err.print(f"[dim]- {st.name}: done, skipped[/]")
        elif kind == "start":
            err.rule(f"{st.name}: blipctl {st.command}")
        else:
            err.print(f"[green]✓ {st.name}[/] in {info['seconds']:.1f} s")

    def call(st, fn):
        if "on_log" not in inspect.signature(fn).parameters:
            return fn(**st.params)
        from blipctl.commands.train import ProgressPrinter

        with ProgressPrinter(st.name) as printer:
            return fn(**st.params, on_log=printer)

    run_recipe(r, from_step=from_step, only=only, on_event=event, call=call)


def register(app: typer.Typer) -> None:
    app.command("run")(guarded(run))
