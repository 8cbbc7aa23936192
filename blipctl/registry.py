"""The one registry of blipctl commands: the CLI registers its subcommands from it, and the recipe runner finds a
step's `command` in it. A command that a recipe can run names its in-process function (keyword arguments, the same
code path as the subcommand); the others (`caption`, `score`, `export`, `run`) are CLI-only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

MODULES = (
    "blipctl.commands.train",
    "blipctl.commands.vision",
    "blipctl.commands.capfilt",
    "blipctl.commands.evaluate",
    "blipctl.commands.model_cmds",
    "blipctl.commands.recipe",
    "blipctl.commands.data",
)
"""Modules with a `register(app)`, in `blipctl --help` order."""

STEPS = {
    "data demo": "blipctl.commands.data:run_demo",
    "data from-json": "blipctl.commands.data:run_from_json",
    "pretrain-vision": "blipctl.commands.vision:run_pretrain_vision",
    "pretrain": "blipctl.commands.train:run_pretrain",
    "finetune-captioner": "blipctl.commands.train:run_finetune_captioner",
    "finetune-filter": "blipctl.commands.train:run_finetune_filter",
    "capfilt": "blipctl.commands.capfilt:run_capfilt",
    "eval-retrieval": "blipctl.commands.evaluate:eval_retrieval",
    "eval-caption": "blipctl.commands.evaluate:eval_caption",
    "compare": "blipctl.commands.compare:run_compare",
}
"""Command name (as typed after `blipctl`) -> its in-process function, for recipe steps."""

TRAINING = ("pretrain", "finetune-captioner", "finetune-filter")
"""The training commands (a recipe's `[defaults.training]` applies to them)."""


def step_function(name: str) -> Callable[..., Any]:
    module, _, attr = STEPS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def register_all(app: Any) -> None:
    for name in MODULES:
        importlib.import_module(name).register(app)
