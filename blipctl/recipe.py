"""Recipes: TOML files that chain blipctl steps into one run (`blipctl run recipes/demo.toml`).

    [recipe]
    name = "demo"
    out = "runs/demo"                 # default parent of every step's `out`
    data = "/data/blip"               # optional: a data root, "${recipe.data}" in steps
    include = "demo.toml"             # optional: that recipe's steps first (path relative to this file)

    [defaults.training]               # merged under the keys of every training step (the step's keys win)
    batch_size = 48                   # `[defaults.<command>]` likewise for one command
    data = { num_workers = 1 }

    [[step]]
    name = "data"                     # unique; later steps refer to its keys as "${data.out}"
    command = "data demo"             # a blipctl command (blipctl/registry.py STEPS)
    scale = "full"                    # the command's own options, by their Python names

A step is done when its `out` carries a marker whose signature (the step's resolved options plus the
signatures of the steps it refers to) matches; done steps are skipped, so a rerun of a finished recipe does
nothing, and changing a step reruns it and everything that depends on it. `--from STEP` reruns STEP and all
later steps; `--only STEP` runs just that one. A failed step stops the run; earlier outputs stay intact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
import shutil
import time
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip.atomic import write_json
from blip.config import check_type, deep_merge
from blip.errors import InputError
from blipctl._common import is_rank0
from blipctl.overrides import parse_value
from blipctl.registry import STEPS, TRAINING

REF = re.compile(r"\$\{([A-Za-z0-9_-]+)\.([A-Za-z0-9_.-]+)\}")
MARKER = ".blipctl-step.json"
RECIPE_KEYS = ("name", "out", "description", "data", "include")
"""[recipe] keys; `data` is a data root that steps refer to as "${recipe.data}"; `include` another recipe whose
steps run first (its [recipe] and [defaults] keys are the base of this file's)."""


@dataclass
class Step:
    name: str
    command: str
    params: dict[str, Any]
    deps: list[str] = field(default_factory=list)
    out: str = ""
    """The step's resolved output (its `out` option, `out_dir` for capfilt)."""


@dataclass
class Recipe:
    path: Path
    meta: dict[str, Any]
    steps: list[Step]


def step_commands() -> dict[str, Callable[..., Any]]:
    """Recipe command name -> in-process function (the same code the CLI subcommand runs; blipctl/registry.py)."""
    from blipctl.registry import STEPS, step_function

    return {name: step_function(name) for name in STEPS}


def _deep_checks() -> dict[str, Callable[[dict[str, Any]], Any]]:
    """Checks beyond the option types: a training step's whole config (nested tables, ranges) as the run
    would build it, so a typo in `optim = { lrr = 1 }` fails at load time, naming the key."""
    from blipctl.commands.train import build_train_config

    tasks = {"pretrain": "pretrain", "finetune-captioner": "captioner", "finetune-filter": "filter"}
    return {cmd: (lambda params, task=task: build_train_config(task, **params)) for cmd, task in tasks.items()}


# ---- loading and validation --------------------------------------------------------------------------------------
def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Parse, apply `step.key=value` overrides, resolve references, and validate every step's options."""
    p = Path(path)
    meta, defaults, raw_steps = _read(p)
    if not raw_steps:
        raise InputError(f"{p}: no [[step]] tables")
    steps: list[Step] = []
    for i, s in enumerate(raw_steps):
        s = dict(s)
        name, command = s.pop("name", None), s.pop("command", None)
        if not name or not command:
            raise InputError(f"{p}: step #{i + 1} needs `name` and `command`")
        if any(st.name == name for st in steps):
            raise InputError(f"{p}: duplicate step name {name!r}")
        base = deep_merge(defaults.get("training", {}) if command in TRAINING else {}, defaults.get(command, {}))
        s = deep_merge(base, s)  # the step's own keys win over [defaults.<command>] over [defaults.training]
        steps.append(Step(name, command, s))
    for ov in overrides or []:
        _apply_override(p, meta, steps, ov)
    commands = step_commands()
    for st in steps:
        if st.command not in commands:
            raise InputError(f"{p}: step {st.name}: unknown command {st.command!r} (known: {', '.join(commands)})")
        key = out_key(commands[st.command])
        default = str(Path(meta.get("out", "runs/" + (meta.get("name") or p.stem))) / st.name)
        st.params.setdefault(key, st.params.pop("out", default))
    resolved: dict[str, dict] = {"recipe": meta}
    deep = _deep_checks()
    for st in steps:
        st.params, st.deps = _resolve(p, st, resolved)
        _validate(p, st, commands[st.command])
        st.out = st.params[out_key(commands[st.command])]
        if st.command in deep:
            try:
                deep[st.command](st.params)
            except InputError as e:
                raise InputError(f"{p}: step {st.name} ({st.command}): {e}") from None
        resolved[st.name] = {**st.params, "out": st.out}
    return Recipe(p, meta, steps)


def _read(p: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """One recipe file as ([recipe], [defaults], [[step]] list), its `include` (a recipe path, relative to this
    file) expanded: the included recipe's steps come first, and this file's [recipe] and [defaults] keys win."""
    if not p.is_file():
        raise InputError(f"recipe not found: {p}" + (f" (included by {chain[-1]})" if chain else ""))
    if p.resolve() in chain:
        raise InputError(f"{p}: includes itself (through {', '.join(str(c) for c in chain)})")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{p}: invalid TOML: {e}") from None
    unknown = set(doc) - {"recipe", "defaults", "step"}
    if unknown:
        raise InputError(f"{p}: unknown top-level key(s) {sorted(unknown)}; expected [recipe], [defaults] and [[step]]")
    defaults = doc.get("defaults", {})
    for group, table in defaults.items():
        if group != "training" and group not in STEPS:
            raise InputError(f"{p}: unknown key defaults.{group} (known: training, {', '.join(STEPS)})")
        if not isinstance(table, dict):
            raise InputError(f"{p}: defaults.{group} must be a table of step keys")
    meta = doc.get("recipe", {})
    for k in meta:
        if k not in RECIPE_KEYS:
            raise InputError(f"{p}: unknown key recipe.{k} (known: {', '.join(RECIPE_KEYS)})")
    steps = list(doc.get("step", []))
    include = meta.pop("include", None)
    if include is None:
        return meta, defaults, steps
    if not isinstance(include, str):
        raise InputError(f"{p}: recipe.include must be a recipe path (a string)")
    inc_meta, inc_defaults, inc_steps = _read(p.parent / include, (*chain, p.resolve()))
    return deep_merge(inc_meta, meta), deep_merge(inc_defaults, defaults), inc_steps + steps


def out_key(fn: Callable) -> str:
    """The option naming a step's output (`out`, or `out_dir` for capfilt); recipes always call it `out`."""
    return "out" if "out" in inspect.signature(fn).parameters else "out_dir"


def _apply_override(p: Path, meta: dict, steps: list[Step], ov: str) -> None:
    key, sep, raw = ov.partition("=")
    if not sep or "." not in key:
        raise InputError(f"override {ov!r}: expected STEP.KEY=VALUE (or recipe.KEY=VALUE)")
    target, _, k = key.partition(".")
    value = parse_value(raw)
    if target == "recipe":
        meta[k] = value
        return
    for st in steps:
        if st.name == target:
            node = st.params
            *parents, last = k.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
            return
    raise InputError(f"override {ov!r}: no step named {target!r} in {p}")


def _resolve(p: Path, st: Step, done: dict[str, dict]) -> tuple[dict, list[str]]:
    deps: list[str] = []

    def sub(v: Any) -> Any:
        if isinstance(v, str):

            def one(m: re.Match) -> str:
                ref, key = m.group(1), m.group(2)
                if ref not in done:
                    raise InputError(f"{p}: step {st.name}: ${{{ref}.{key}}} refers to no earlier step")
                node: Any = done[ref]
                for part in key.split("."):
                    if not isinstance(node, dict) or part not in node:
                        raise InputError(f"{p}: step {st.name}: ${{{ref}.{key}}}: step {ref} has no key {key!r}")
                    node = node[part]
                if ref != "recipe" and ref not in deps:
                    deps.append(ref)
                return str(node)

            return REF.sub(one, v)
        if isinstance(v, list):
            return [sub(x) for x in v]
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        return v

    return sub(st.params), deps


def _validate(p: Path, st: Step, fn: Callable) -> None:
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    known = {n for n, prm in sig.parameters.items() if prm.kind in (prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY)}
    for k, v in st.params.items():
        if k not in known:
            raise InputError(
                f"{p}: step {st.name} ({st.command}): unknown key {k!r}; known: {', '.join(sorted(known))}"
            )
        if k in hints:
            st.params[k] = check_type(v, hints[k], f"{st.name}.{k}")
    missing = [
        n
        for n, prm in sig.parameters.items()
        if prm.default is inspect.Parameter.empty and n in known and n not in st.params
    ]
    if missing:
        raise InputError(f"{p}: step {st.name} ({st.command}): missing required key(s) {missing}")


# ---- running -----------------------------------------------------------------------------------------------------
def signature(st: Step, sigs: dict[str, str]) -> str:
    blob = json.dumps(
        {"command": st.command, "params": st.params, "deps": {d: sigs[d] for d in st.deps}}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def marker_path(st: Step) -> Path:
    out = Path(st.out)
    return out / MARKER if not out.suffix else out.with_name(f".{out.name}{MARKER}")


def is_done(st: Step, sig: str) -> bool:
    mk = marker_path(st)
    try:
        return json.loads(mk.read_text()).get("signature") == sig
    except (OSError, ValueError):
        return False


def plan(recipe: Recipe) -> list[tuple[Step, bool]]:
    """Each step with whether it is done (its marker matches its current signature)."""
    sigs: dict[str, str] = {}
    out = []
    for st in recipe.steps:
        sigs[st.name] = signature(st, sigs)
        out.append((st, is_done(st, sigs[st.name])))
    return out


TRAIN_COMMANDS = TRAINING


def _read_marker(mk: Path) -> dict[str, Any]:
    try:
        d = json.loads(mk.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != MARKER) if out.is_dir() else []


def _prepare_rerun(st: Step, mk: Path) -> Step:
    """A step that finished before (its marker has a signature) but runs again (changed, --from, --only) starts
    clean: the entries of its `out` that it wrote (recorded in the marker) are removed, since training refuses a
    used --out and CapFilt would keep its finished shards; files the user put there are never touched. A step
    that never finished (a killed run) continues instead: training with --resume auto, CapFilt by skipping its
    finished shards.

    Under torchrun only rank 0 deletes. The other ranks' own view does not matter: training's resume decision is
    rank 0's (broadcast), evaluations write on rank 0, and CapFilt meets at a barrier before it reads its output."""
    out = Path(st.out)
    old = _read_marker(mk)
    if old.get("signature"):
        if is_rank0():
            if mk.parent == out:  # a directory output holding our marker: remove what the step wrote
                for name in _written(out, mk, old):
                    p = out / name
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
            else:
                out.unlink(missing_ok=True)
            mk.unlink(missing_ok=True)
        return st
    if st.command in TRAIN_COMMANDS and st.params.get("resume") is None and (out / "latest").exists():
        return dataclasses.replace(st, params={**st.params, "resume": "auto"})
    return st


def _written(out: Path, mk: Path, marker: dict[str, Any]) -> list[str]:
    """What a finished step wrote in `out`: the marker's list; for a marker from before the list was recorded,
    the entries not changed since the marker was written (a file the user added later is newer)."""
    if isinstance(marker.get("files"), list):
        return [f for f in marker["files"] if isinstance(f, str) and Path(f).name == f and f not in (".", "..")]
    t = mk.stat().st_mtime
    return [n for n in _entries(out) if (out / n).lstat().st_mtime <= t]


def run_recipe(
    recipe: Recipe,
    from_step: str | None = None,
    only: str | None = None,
    on_event: Callable[[str, Step, dict], None] | None = None,
    call: Callable[[Step, Callable[..., Any]], Any] | None = None,
) -> dict[str, Any]:
    """Run (or skip) each step in order; returns {step name: result or 'skipped'}.

    `call(step, fn)` runs one step's function (the CLI passes one that draws progress); default `fn(**params)`.
    """
    names = [s.name for s in recipe.steps]
    for flag, v in (("--from", from_step), ("--only", only)):
        if v is not None and v not in names:
            raise InputError(f"{flag} {v!r}: no such step (steps: {', '.join(names)})")
    commands = step_commands()
    sigs: dict[str, str] = {}
    results: dict[str, Any] = {}
    forced = False
    for st in recipe.steps:
        sigs[st.name] = signature(st, sigs)
        forced = forced or st.name == from_step
        if only is not None and st.name != only:
            continue
        mk = marker_path(st)
        if is_done(st, sigs[st.name]) and not forced and only is None:
            results[st.name] = "skipped"
            if on_event:
                on_event("skip", st, {})
            continue
        if on_event:
            on_event("start", st, {})
        t0 = time.perf_counter()
        run_st = _prepare_rerun(st, mk)
        out = Path(st.out)
        # what was in `out` before the step first ran (kept across a killed attempt) is not the step's to delete
        before = _read_marker(mk).get("before")
        if not isinstance(before, list):
            before = _entries(out)
            if is_rank0() and mk.parent == out:
                write_json(mk, {"step": st.name, "command": st.command, "before": before}, ensure_ascii=False)
        fn = commands[st.command]
        result = call(run_st, fn) if call is not None else fn(**run_st.params)
        info = {"signature": sigs[st.name], "step": st.name, "command": st.command, "seconds": time.perf_counter() - t0}
        if mk.parent == out:
            info["files"] = [n for n in _entries(out) if n not in before]  # what this step wrote
        if is_rank0():  # under torchrun (`--only STEP`), rank 0 marks the step done
            write_json(mk, info, ensure_ascii=False)
        results[st.name] = result
        if on_event:
            on_event("done", st, info)
    return results
