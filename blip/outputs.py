"""Output directories: may blipctl write here, and what in them is blipctl's (DESIGN §10).

blipctl never deletes a file it did not write. A non-empty output directory that is not a blipctl output of the
same kind is refused (InputError naming the directory and what it holds) unless `overwrite` is given; even then
only the files blipctl writes are replaced, and every other file stays.

Kinds, and how an existing directory is recognised (from what each writer already writes):
    run          a training run: train_config.json (written first, before any step)
    checkpoint   a native model directory: config.json with "format": "blipctl"
    hf-export    a transformers directory blipctl exported: a `.blipctl` file saying "hf-export" (a downloaded
                 Hugging Face model has the same files, and is the user's)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from blip.errors import InputError

MARKER = ".blipctl"
"""A one-line file naming the kind, for outputs whose own files do not say that blipctl wrote them."""
BOOKKEEPING = {".blipctl-step.json"}
"""Files blipctl keeps beside any output (a recipe step's marker): they do not make a directory someone else's."""
KIND_NAMES = {"run": "training run", "checkpoint": "blipctl checkpoint", "hf-export": "blipctl Hugging Face export"}


def output_kind(d: str | os.PathLike) -> str | None:
    """The kind of blipctl output directory `d` is, or None (missing, empty, or someone else's)."""
    d = Path(d)
    if (d / "train_config.json").is_file():
        return "run"
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and cfg.get("format") == "blipctl":
            return "checkpoint"
    except (OSError, ValueError, RecursionError):
        pass
    try:
        kind = (d / MARKER).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return kind if kind in KIND_NAMES else None


def check_output_dir(d: str | os.PathLike, kind: str, overwrite: bool = False, param: str = "out") -> None:
    """Refuse to write a `kind` output into `d` when it is a file, or a non-empty directory that is not a blipctl
    output of this kind, unless `overwrite` (which writes blipctl's files into it and keeps all others)."""
    d = Path(d).expanduser()
    if not d.exists():
        return
    if not d.is_dir():
        raise InputError(f"{param}: {d} is a file, not a directory", param=param)
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in d.iterdir() if p.name not in BOOKKEEPING)
    if not entries or overwrite:
        return
    found = output_kind(d)
    if found == kind:
        return
    what = f"a {KIND_NAMES[found]}" if found else "not written by blipctl"
    shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
    raise InputError(
        f"{param}: {d} is not empty ({shown}) and is {what}, not a {KIND_NAMES[kind]}; choose another {param} "
        f"or pass overwrite to write into it (blipctl then replaces only the files it writes; nothing else is "
        f"deleted)",
        param=(param, "overwrite"),
    )


def mark(d: str | os.PathLike, kind: str) -> None:
    """Record that `d` is a blipctl output of `kind` (for kinds its own files do not tell)."""
    (Path(d) / MARKER).write_text(kind + "\n")


def install_dir(tmp: Path, out: Path, last: str = "config.json") -> None:
    """Move a finished temporary directory's entries into `out`: a new `out` is renamed into place at once; into
    an existing one each entry replaces its namesake and nothing else is touched, `last` (whose presence means
    complete) removed first and moved in last."""
    if not out.exists():
        os.replace(tmp, out)
        return
    (out / last).unlink(missing_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == last):
        dst = out / f.name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(f, dst)
    shutil.rmtree(tmp, ignore_errors=True)
