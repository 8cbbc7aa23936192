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


def _default_mode() -> int:
    """What open() would give a new file (0o666 less the umask); mkstemp's own 0o600 would hide outputs."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_MODE = _default_mode()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it replaces `path`, on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _MODE)
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
