"""Atomic file writes: write a temporary sibling, then rename it over the target.

A reader (a resumed run, a concurrent rank, a recipe checking its markers) sees the old file or the new one,
never half of one; a killed writer leaves at most a hidden temporary file behind, which the next write replaces.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask, read now (a caller may have changed it since import); os.umask can only be read by
    setting it, so it is set back at once."""
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """What open() gives a new file (0o666 less the umask); mkstemp's own 0o600 would hide outputs from others."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """What mkdir gives a new directory (0o777 less the umask); mkdtemp's own 0o700 would hide outputs."""
    return 0o777 & ~_umask()


def temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new temporary directory in `parent` (to be renamed into place) with the umask's mode, like mkdir."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, dir_mode())
    return tmp


def umask_modes(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the umask's modes: some writers (safetensors) create files 0600."""
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(root, dmode)
    for d, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(d, name), dmode)
        for name in files:
            os.chmod(os.path.join(d, name), fmode)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it replaces `path`, on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, file_mode())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, ensure_ascii: bool = True) -> None:
    """JSON with a trailing newline."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii) + "\n")
