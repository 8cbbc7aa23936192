"""Building a training run: the model and tokenizer (fresh, --init or resumed), the task, momentum encoders,
optimizer, precision, DDP wrapper and the data loader. What to build comes from the task class (blip/tasks.py):
its layout, its loss set, whether it needs momentum encoders."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip import distributed as D
from blip.checkpoint import load_model, load_weights
from blip.config import BlipConfig, model_config
from blip.errors import InputError
from blip.model.blip import BLIP
from blip.model.momentum import Momentum
from blip.tasks import TASKS, PretrainTask
from blip.tokenizer import Tokenizer
from blip.train_config import TrainConfig

LAYOUT = {name: t.layout for name, t in TASKS.items()}
"""(text encoder, text decoder) of the model each task trains and saves."""


class TrainSetup:
    """The building half of blip.train.Trainer (a mixin: it sets the trainer's model, task, optimizer...)."""

    def build_model(self, resume_dir: Path | None) -> tuple[BLIP, Tokenizer]:
        """The task's model: from a checkpoint (resume), an init source, or fresh; plus its tokenizer."""
        cfg = self.cfg
        if resume_dir is not None:
            loaded = load_model(resume_dir)
            model = _derive(loaded.model, cfg, str(resume_dir))
            return model, loaded.tokenizer
        task = TASKS[cfg.task]
        if not cfg.model.init and task is not PretrainTask:
            raise InputError(
                f"model.init: {task.command} starts from a pre-trained model; set model.init", param="model.init"
            )
        if cfg.model.init:
            if cfg.model.text_init or cfg.model.vision_init:
                raise InputError(
                    "model.text_init / model.vision_init: only for fresh models (not with model.init)",
                    param="model.init",
                )
            loaded = load_model(cfg.model.init, tokenizer=cfg.model.tokenizer)
            src = loaded.model.config
            task.check_init(src, cfg.model.init)
            if cfg.model.patch_size not in (None, src.vision.patch_size):
                raise InputError(
                    f"model.patch_size: {cfg.model.patch_size}, but model.init {cfg.model.init} has patches of "
                    f"{src.vision.patch_size} (only fresh models choose it)"
                )
            if cfg.model.stem not in (None, src.vision.stem):
                raise InputError(
                    f"model.stem: {cfg.model.stem!r}, but model.init {cfg.model.init} has stem {src.vision.stem!r} "
                    "(only fresh models choose it)"
                )
            model = _derive(loaded.model, cfg, cfg.model.init)
            return model, loaded.tokenizer
        return self.fresh_model()

    def fresh_model(self) -> tuple[BLIP, Tokenizer]:
        from blip.init import init_text_from_bert, init_vision_from_timm

        cfg = self.cfg
        tok = self.fresh_tokenizer()
        enc, dec = TASKS[cfg.task].layout
        mc = model_config(cfg.model.size, image_size=cfg.model.image_size, tokenizer=tok)
        if cfg.model.patch_size is not None:
            mc = dataclasses.replace(mc, vision=dataclasses.replace(mc.vision, patch_size=cfg.model.patch_size))
        if cfg.model.stem is not None:
            mc = dataclasses.replace(mc, vision=dataclasses.replace(mc.vision, stem=cfg.model.stem))
        mc = dataclasses.replace(mc, text_encoder=enc, text_decoder=dec)
        model = BLIP(_apply_model_overrides(mc, cfg))
        if cfg.model.text_init:
            init_text_from_bert(model, cfg.model.text_init)
        if cfg.model.vision_init:
            init_vision_from_timm(model, cfg.model.vision_init)
        return model, tok

    def fresh_tokenizer(self) -> Tokenizer:
        cfg = self.cfg
        if cfg.model.tokenizer:
            return Tokenizer.from_pretrained(cfg.model.tokenizer)
        if cfg.model.text_init:
            d = Path(cfg.model.text_init)
            if (d / "vocab.txt").exists() or (d / "tokenizer.json").exists():
                return Tokenizer.from_pretrained(d)
        # build one from the captions on rank 0 (the other ranks need not read them) and broadcast the vocabulary
        vocab = None
        if self.info.is_main:
            captions = self.caption_sample(cfg.model.tokenizer_samples)
            if not captions:
                raise InputError(
                    "data.train: no captions found to train a tokenizer on (set model.tokenizer)",
                    param="model.tokenizer",
                )
            tok = Tokenizer.train(captions, vocab_size=cfg.model.tokenizer_vocab)
            ordered = sorted(tok.hf.get_vocab().items(), key=lambda kv: kv[1])
            vocab = [t for t, _ in ordered if t not in ("[DEC]", "[ENC]")]  # re-added last, as specials
        vocab = D.broadcast_object(vocab, self.info)
        return tok if self.info.is_main else Tokenizer.from_vocab(vocab)

    def caption_sample(self, limit: int) -> list[str]:
        if self.loader_fn is not None:
            out: list[str] = []
            for b in self.loader_fn(epoch=0, skip_batches=0, rank=0, world_size=1):
                out.extend(b["caption"])
                if len(out) >= limit:
                    break
            return out[:limit]
        from blip.data.loader import read_captions

        return list(read_captions(self.data_source(), limit=limit, max_words=self.cfg.data.max_words))

    def build_momentum(self) -> Momentum | None:
        if not TASKS[self.cfg.task].needs_momentum(self.cfg.loss):
            return None
        c = self.cfg.loss
        return Momentum(self.model, queue_size=c.queue_size, momentum=c.momentum).to(self.info.device)

    def build_task(self) -> nn.Module:
        return TASKS[self.cfg.task].from_config(self.model, self.momentum, self.cfg, self.tok)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters; each group's `lr_scale` multiplies the schedule's lr (set_lr).
        `optim.vision_lr_scale = 0` locks the tower here: its parameters stop requiring gradients and join no group
        (the loop keeps it in eval mode)."""
        o = self.cfg.optim
        if o.vision_lr_scale == 0:
            self.model.visual_encoder.requires_grad_(False)
        named = list(self.model.named_parameters())
        if o.vision_lr_scale == 1.0:  # one lr for all: the two groups of earlier checkpoints' optimizer state
            groups = decay_groups(named, o.weight_decay, lr_scale=1.0)
        else:
            tower = [(n, p) for n, p in named if n.startswith("visual_encoder.")]
            rest = [(n, p) for n, p in named if not n.startswith("visual_encoder.")]
            groups = decay_groups(rest, o.weight_decay, lr_scale=1.0)
            groups += decay_groups(tower, o.weight_decay, lr_scale=o.vision_lr_scale)
        groups = [g for g in groups if g["params"]]
        impl = o.impl
        if impl == "auto":  # fused is also the fastest on CPU (~5x foreach for AdamW in torch 2.x)
            impl = "fused" if self.info.device.type in ("cuda", "cpu") else "foreach"
        kw = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **kw)

    def build_precision(self) -> tuple[torch.dtype, torch.amp.GradScaler]:
        """Autocast dtype (blip.precision; weights and optimizer state stay fp32) and the fp16 scaler. Training's
        `auto` is bf16 on bf16 GPUs only: on CPU a bf16 training step was not measured faster (tiny model, loaded
        machine: 18.5 against 15.7 s/step), so CPU training stays fp32 unless train.precision=bf16 is asked for."""
        from blip.precision import resolve

        p, dev = self.cfg.train.precision, self.info.device
        if p == "auto" and dev.type != "cuda":
            p = "fp32"
        dtype = resolve(p, dev, key="train.precision")
        return dtype, torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)

    def compile(self) -> None:
        """Compile the heavy blocks in place (state-dict names unchanged); dynamic text lengths are fine."""
        for mod in [self.model, self.momentum]:
            if mod is None:
                continue
            for m in mod.modules():
                if type(m).__name__ in ("Block", "Layer"):  # timm ViT blocks, MED text layers
                    m.compile(dynamic=True)

    def wrap_ddp(self) -> nn.Module:
        if not self.info.distributed:
            return self.task
        weights = TASKS[self.cfg.task].ddp_loss_weights(self.cfg.loss)
        dev = self.info.device
        # the queues are filled identically on every rank: never re-broadcast them in forward
        # (`broadcast_buffers` was renamed `forward_sync_buffers` in recent torch)
        params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return nn.parallel.DistributedDataParallel(
            self.task,
            device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=any(w == 0 for w in weights),
            **no_sync,
        )

    # ---- data -----------------------------------------------------------------------------------------------
    def data_source(self) -> Any:
        """`data.train` -> what the loader reads: shard specs as given, or the pairs of coco / flickr30k / an
        annotation JSON (which must then be the only source)."""
        if self._source is not None:
            return self._source
        srcs = self.cfg.data.train
        named = [s for s in srcs if s in ("coco", "flickr30k") or s.endswith(".json")]
        if not named:
            self._source = list(srcs)
        elif len(srcs) > 1:
            raise InputError(f"data.train: {named[0]!r} is a dataset; it cannot be combined with other sources")
        else:
            from blip.data.datasets import load_train_pairs

            self._source = load_train_pairs(srcs[0], split="train", data_root=self.cfg.data.data_root)
        return self._source

    def make_loader(self, epoch: int, skip: int) -> Iterable[dict[str, Any]]:
        cfg, info = self.cfg, self.info
        if self.loader_fn is not None:
            return self.loader_fn(epoch=epoch, skip_batches=skip, rank=info.rank, world_size=info.world_size)
        from blip.data.loader import build_train_loader

        d = cfg.data
        return build_train_loader(
            self.data_source(),
            image_size=cfg.model.image_size,
            batch_size=d.batch_size,
            num_workers=d.num_workers,
            seed=cfg.train.seed,
            epoch=epoch,
            rank=info.rank,
            world_size=info.world_size,
            min_scale=d.min_scale,
            randaugment=d.randaugment,
            hflip=d.hflip,
            skip_batches=skip,
            strict=d.strict,
            max_words=d.max_words,
            prompt=d.prompt,
            shuffle_buffer=d.shuffle_buffer,
        )

    def count_batches(self) -> int | None:
        """Micro-batches per rank per epoch, for the alpha ramp and the progress bar: from data.num_samples, else
        counted once on rank 0 (captions only, no image decoding); None with a custom loader and no count."""
        d = self.cfg.data
        n = d.num_samples
        if n is None and self.loader_fn is None:
            if self.info.is_main:
                from blip.data.loader import count_pairs

                self.emit({"event": "info", "message": "counting the training pairs (data.num_samples skips this)"})
                n = count_pairs(self.data_source(), max_words=d.max_words)
            n = D.broadcast_object(n, self.info)
        if n is None:
            return None
        per_rank = n // (d.batch_size * self.info.world_size)
        if per_rank < 1:
            raise InputError(
                f"data.batch_size: {n} training pairs are fewer than one global batch "
                f"({d.batch_size} x {self.info.world_size} ranks)"
            )
        return per_rank


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, norm weights, temp (ndim < 2) and position / class embeddings are not decayed."""
    return p.ndim < 2 or name.endswith(("pos_embed", "cls_token", "position_embeddings.weight"))


def decay_groups(named: Iterable[tuple[str, torch.Tensor]], weight_decay: float, **extra: Any) -> list[dict]:
    """Two AdamW groups of the parameters that require gradients: decayed weights, and the rest (no_weight_decay).
    `extra` goes into both (e.g. lr_scale)."""
    decay, rest = [], []
    for name, p in named:
        if p.requires_grad:
            (rest if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, **extra}, {"params": rest, "weight_decay": 0.0, **extra}]


def _apply_model_overrides(mc: BlipConfig, cfg: TrainConfig) -> BlipConfig:
    m = cfg.model
    vision = dataclasses.replace(mc.vision, image_size=m.image_size, grad_ckpt_layers=m.grad_ckpt_layers)
    if m.drop_path is not None:
        vision = dataclasses.replace(vision, drop_path=m.drop_path)
    text = mc.text if m.dropout is None else dataclasses.replace(mc.text, dropout=m.dropout)
    return dataclasses.replace(mc, vision=vision, text=text)


def _derive(src: BLIP, cfg: TrainConfig, where: str) -> BLIP:
    """The task's model built from another one: layout, image size and training options from `cfg`, every
    weight the source has copied over (position embeddings interpolated). Pre-training ties encoder and
    decoder (all but self-attention), as the original."""
    enc, dec = TASKS[cfg.task].layout
    mc = dataclasses.replace(src.config, text_encoder=enc, text_decoder=dec, share_text=enc and dec)
    model = BLIP(_apply_model_overrides(mc, cfg))
    load_weights(model, src.state_dict(), where, strict=False)
    return model
