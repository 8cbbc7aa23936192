"""Shared CLI plumbing: error handling (exit codes), consoles, progress bars, JSON lines."""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from blip.errors import InputError

# Human-facing output (tables, progress, warnings) goes to stderr so `--json` keeps stdout clean.
err = Console(stderr=True)
out = Console()

PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (bf16 on GPUs with bf16 and on CPUs with AVX512-BF16/AMX, else fp32), fp32 or bf16 (autocast).",
    ),
]


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map library exceptions to the CLI contract: InputError -> exit 2, anything else -> exit 1, no traceback.

    Set BLIPCTL_DEBUG=1 to see the traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except InputError as e:
            if os.environ.get("BLIPCTL_DEBUG"):
                raise
            err.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the CLI boundary
            if os.environ.get("BLIPCTL_DEBUG"):
                raise
            err.print(f"[bold red]error:[/] {type(e).__name__}: {e}", highlight=False)
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


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary sibling, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
