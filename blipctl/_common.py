"""Shared CLI plumbing: error handling (exit codes), consoles, progress bars, JSON lines."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from blip.errors import InputError

# Human-facing output (tables, progress, warnings) goes to stderr so `--json` keeps stdout clean.
err = Console(stderr=True)
out = Console()

PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="fp32, bf16 (autocast; weights stay fp32) or auto: bf16 where the hardware computes it natively "
        "(GPUs with bf16, CPUs with AVX512-BF16 or AMX), else fp32.",
    ),
]


def flag_names(fn: Callable[..., Any]) -> dict[str, str]:
    """Parameter name -> how the command line spells it: an option's first declared flag (else `--name-with-
    dashes`), an argument's metavar (`DATASET`)."""
    import inspect
    import typing

    hints = typing.get_type_hints(fn, include_extras=True)
    names = {}
    for name in inspect.signature(fn).parameters:
        info = next((m for m in getattr(hints.get(name), "__metadata__", ()) if hasattr(m, "param_decls")), None)
        if isinstance(info, typer.models.ArgumentInfo):
            names[name] = name.upper()
            continue
        # Annotated[..., typer.Option("--in")]: the first declaration sits in `default`
        first = [info.default] if info is not None and isinstance(info.default, str) else []
        decls = [d for d in [*first, *(getattr(info, "param_decls", None) or ())] if d.startswith("--")]
        names[name] = decls[0].split("/")[0] if decls else "--" + name.replace("_", "-")
    return names


def cli_message(e: InputError, flags: dict[str, str]) -> str:
    """The library's message with the parameters it names (InputError.params) spelled as this command's flags."""
    msg = str(e)
    for p in getattr(e, "params", ()):
        if p in flags:
            # a whole word: not part of a longer name, a flag, a path (`runs/out`) or a file name (`tokenizer.json`)
            msg = re.sub(rf"(?<![\w./-]){re.escape(p)}(?![\w-]|\.\w)", flags[p], msg)
    return msg


def guarded(fn: Callable[..., Any], flags: dict[str, str] | None = None) -> Callable[..., Any]:
    """Map library exceptions to the CLI contract: InputError -> exit 2, anything else -> exit 1, no traceback.

    An InputError's parameter names become the command's flags (`flags`, default: read from `fn`'s options), so
    library messages speak Python and CLI messages speak flags. Set BLIPCTL_DEBUG=1 to see the traceback.
    """
    table = {**flag_names(fn), **(flags or {})}

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except InputError as e:
            if os.environ.get("BLIPCTL_DEBUG"):
                raise
            err.print(f"[bold red]error:[/] {escape(cli_message(e, table))}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the CLI boundary
            if os.environ.get("BLIPCTL_DEBUG"):
                raise
            err.print(f"[bold red]error:[/] {escape(f'{type(e).__name__}: {e}')}", highlight=False)
            err.print("[dim](set BLIPCTL_DEBUG=1 for the traceback)[/]")
            raise typer.Exit(1) from None

    return wrapper


def progress(transient: bool = False) -> Progress:
    """A rich progress bar with count, throughput-friendly columns and ETA, drawn on stderr."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
        disable=not err.is_terminal and not os.environ.get("BLIPCTL_PROGRESS"),
    )


def print_json_line(obj: dict) -> None:
    """One JSON object per line on stdout, nothing else (the `--json` contract)."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def is_rank0() -> bool:
    """Rank 0 of a torchrun job, or a plain process; from the environment, so it works before (or without) a
    process group: the one process that prints, marks recipe steps done, or deletes outputs."""
    return int(os.environ.get("RANK", "0")) == 0
