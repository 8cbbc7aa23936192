"""blip: the BLIP model library (model, losses, data, generation, evaluation, CapFilt).

    import blip
    m = blip.load("Salesforce/blip-image-captioning-base")      # any model source, with tokenizer and transform
    m.caption(["a.jpg"], num_beams=3)                             # or sample=True, top_p=0.9
    m.score("a.jpg", ["a dog", "a cat"])                          # ITM probability and ITC cosine
    blip.capfilt.run("web/", "clean/", captioner=..., filter=..., config=blip.CapfiltConfig())
    blip.train(blip.build_config("pretrain", {...}))              # the loop behind pretrain / finetune-*
    blip.pretrain_vision(blip.VisionPretrainConfig(...))          # a ViT classified on labels, for vision_init
    blip.eval.retrieval("coco", model=...), blip.eval.caption("coco", model=...)
    blip.model_config("tiny", tokenizer=tok)                      # special token ids from the tokenizer

Never imports blipctl, typer or rich: the CLI sits on top of this package, not inside it. Heavy modules (torch)
load on first use of a name, so `import blip` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": ("blip.api", "load"),
    "Model": ("blip.api", "Model"),
    "caption_images": ("blip.api", "caption_images"),
    "score_texts": ("blip.api", "score_texts"),
    "iter_inputs": ("blip.inputs", "iter_inputs"),
    "CapfiltConfig": ("blip.capfilt", "CapfiltConfig"),
    "model_config": ("blip.config", "model_config"),
    "BlipConfig": ("blip.config", "BlipConfig"),
    "build_config": ("blip.train_config", "build_config"),
    "TrainConfig": ("blip.train_config", "TrainConfig"),
    "Tokenizer": ("blip.tokenizer", "Tokenizer"),
    "InputError": ("blip.errors", "InputError"),
    "pretrain_vision": ("blip.vision_pretrain", "pretrain_vision"),
    "VisionPretrainConfig": ("blip.vision_pretrain_config", "VisionPretrainConfig"),
}
_SUBMODULES = ("capfilt", "eval", "train", "data", "model", "checkpoint", "generation")
"""`blip.train`, `blip.eval.retrieval` and `blip.eval.caption` are modules that can be called (blip/_callable.py)."""

__all__ = [*_LAZY, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"blip.{name}")
    raise AttributeError(f"module 'blip' has no attribute {name!r}")
