"""`blipctl pretrain-vision`: a thin wrapper over `blip.vision_pretrain.pretrain_vision`.

`run_pretrain_vision` is what the recipe runner calls in-process: its keyword arguments are the fields of
`VisionPretrainConfig` (the signature is built from them, so a recipe key that is not a field fails by name).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from blip.vision_pretrain_config import VisionPretrainConfig
from blipctl._common import err, guarded
from blipctl.overrides import parse_overrides


def run_pretrain_vision(on_log: Any = None, **options: Any) -> dict[str, Any]:
    """Pre-train a ViT by classifying labelled images; returns the run's result (see blip.vision_pretrain)."""
    from blip.vision_pretrain import pretrain_vision
    from blip.vision_pretrain_config import vision_pretrain_config

    for key in ("train", "val"):
        if isinstance(options.get(key), str):
            options[key] = [options[key]]
    return pretrain_vision(vision_pretrain_config(options), on_log=on_log)


def _signature() -> tuple[inspect.Signature, dict[str, Any]]:
    hints = typing.get_type_hints(VisionPretrainConfig)
    params, annotations = [inspect.Parameter("on_log", inspect.Parameter.KEYWORD_ONLY, default=None)], {}
    for f in dataclasses.fields(VisionPretrainConfig):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        t = hints[f.name] | str if f.name in ("train", "val") else hints[f.name]  # one shard spec or a list
        default = (
            inspect.Parameter.empty
            if required
            else (
                f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            )
        )
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=t))
        annotations[f.name] = t
    return inspect.Signature(params), annotations


run_pretrain_vision.__signature__, run_pretrain_vision.__annotations__ = _signature()  # type: ignore[attr-defined]


def _heads(spec: str) -> dict[str, int]:
    from blip.errors import InputError

    heads = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, n = part.partition("=")
        if not n.strip().isdigit():
            raise InputError(f"heads: expected NAME=CLASSES[,NAME=CLASSES...], got {spec!r}", param="heads")
        heads[name.strip()] = int(n)
    return heads


def register(app: typer.Typer) -> None:
    @app.command("pretrain-vision", context_settings={"help_option_names": ["-h", "--help"]})
    @guarded
    def pretrain_vision(
        data: Annotated[list[str], typer.Option("--data", help="Labelled training shards (repeat for more).")],
        out: Annotated[str, typer.Option("--out", help="Output dir: vit.safetensors for model.vision_init.")],
        heads: Annotated[
            str, typer.Option("--heads", help="Label heads and their class counts: shape=5,color=6 (or cls=1000).")
        ],
        val: Annotated[
            list[str] | None, typer.Option("--val", help="Held-out labelled shards: accuracy per head.")
        ] = None,
        overrides: Annotated[
            list[str] | None,
            typer.Argument(help="KEY=VALUE options: size, image_size, stem, steps, batch_size, lr, seed, ..."),
        ] = None,
    ) -> None:
        """Pre-train the vision tower alone by classifying labelled images (BLIP's ImageNet start, for any labels).

        Labels come from json.labels ({"shape": 3, "color": 1}: one linear head on [CLS] per name) or a cls member
        (one integer, webdataset's ImageNet layout: --heads cls=1000). The tower goes to OUT/vit.safetensors;
        start a pre-training from it with model.vision_init=OUT and the same model.stem / image size, and lock it
        there while the text side is untrained (optim.vision_lr_scale=0), or its first steps undo what it learnt.

        Options (KEY=VALUE): size tiny|base|large (tiny), image_size (224), patch_size, stem none|conv (none),
        pool cls|mean (cls: heads on [CLS]; mean: on the mean patch token), steps (1000), batch_size (64), lr (1e-3,
        cosine to min_lr 1e-5 after warmup_steps 30), weight_decay (0.05), min_scale (1.0: no crop), hflip (false),
        shuffle_buffer (5000), log_every (100), seed (0), device auto|cpu|cuda, overwrite (false).

        Example (the demo world's objects split):

          blipctl pretrain-vision --data demo/objects --val demo/objects_val --out runs/vit
            --heads shape=5,color=6,size=2,position=5 size=tiny image_size=96 stem=conv steps=700
        """
        from blip.config import deep_merge

        options = deep_merge(parse_overrides(overrides), {"train": data, "out": out, "heads": _heads(heads)})
        if val:
            options["val"] = val
        from blipctl.commands.train import ProgressPrinter

        with ProgressPrinter("pretrain-vision") as printer:
            result = run_pretrain_vision(on_log=printer, **options)
        accs = "  ".join(f"{k[4:-4]} {v:.3f}" for k, v in result.items() if k.startswith("val_") and k.endswith("_acc"))
        bad = result["data"].get("bad")
        if bad:
            err.print(f"[yellow]data:[/] {bad} bad samples skipped", highlight=False)
        err.print(f"[green]done[/]: step {result.get('step')}  {accs}\ntower: {Path(out) / 'vit.safetensors'}")
