"""Config input for the CLI: `--config FILE.toml` tables and trailing `KEY=VALUE` overrides -> one plain dict.

TOML parsing lives here, in the CLI package: the library (`blip/`) only ever sees plain dicts and validates
them against its dataclasses (unknown keys and wrong types are reported there, naming the key).

Override values are TOML literals (`optim.lr=1e-4`, `data.train=["a.tar","b.tar"]`, `train.tensorboard=true`);
anything that does not parse as one is kept as a string (`model.init=runs/pt`), so paths need no quoting;
a bare `none` (or `null`) is None.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from blip.config import deep_merge
from blip.errors import InputError


def parse_value(raw: str) -> Any:
    """A TOML literal (number, bool, string, array, inline table); bare `none` / `null` is None (TOML has no
    null: this resets an optional key, e.g. `train.max_steps=none`); else the raw string."""
    if raw.strip().lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_overrides(items: Iterable[str] | None) -> dict[str, Any]:
    """`["optim.lr=1e-4", "data.batch_size=16"]` -> `{"optim": {"lr": 1e-4}, "data": {"batch_size": 16}}`."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"bad override {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
        parts = key.split(".")
        if any(not p for p in parts):
            raise InputError(f"bad override key {key!r}: expected dotted names like data.batch_size")
        set_dotted(out, parts, parse_value(raw.strip()), key)
    return out


def set_dotted(d: dict[str, Any], parts: list[str], value: Any, key: str) -> None:
    """Set d[a][b][c] = value for parts [a, b, c], creating tables on the way."""
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise InputError(f"override {key}: {p} is a value, not a table")
        d = nxt
    d[parts[-1]] = value


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing file or a syntax error is an InputError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--config: no such file: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"--config {p}: invalid TOML ({e})") from None
    except UnicodeDecodeError:
        raise InputError(f"--config {p}: not UTF-8 text") from None


def resolve(
    config_file: str | Path | None = None, flags: dict[str, Any] | None = None, overrides: Iterable[str] | None = None
) -> dict[str, Any]:
    """Precedence, lowest first: config file < command-line flags < trailing KEY=VALUE overrides."""
    d = load_toml(config_file) if config_file else {}
    d = deep_merge(d, flags or {})
    return deep_merge(d, parse_overrides(overrides))
