"""Modules that are also verbs: `blip.train(cfg)`, `blip.eval.retrieval(...)`, `blip.eval.caption(...)`.

A submodule import sets the package attribute to the module, so a function of the same name in the package would
be replaced by the module as soon as anyone imports it; instead the module itself becomes callable.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def make_callable(module_name: str, fn_name: str) -> None:
    """Calling module `module_name` calls its function `fn_name`."""
    module = sys.modules[module_name]

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(self, fn_name)(*args, **kwargs)

    CallableModule.__name__ = f"CallableModule[{module_name}.{fn_name}]"
    module.__class__ = CallableModule
