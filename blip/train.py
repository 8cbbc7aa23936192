"""One training loop for `pretrain`, `finetune-captioner` and `finetune-filter`, from a laptop to torchrun.

    cfg = build_config("pretrain", {"data": {"train": ["shards/"]}, "train": {"out": "runs/pt"}})
    result = train(cfg, on_log=print)

Output directory (`train.out`):
    config.json, model.safetensors, tokenizer files   the final model: `--model OUT` / `--init OUT` load it
    train_config.json                                  the resolved config of the run
    metrics.jsonl                                      one line per log step (losses, lr, samples/s)
    checkpoints/step_000100/                           a loadable model + train_state/ (exact resume)
    latest                                             text file naming the newest checkpoint
    tensorboard/                                       with train.tensorboard = true

The final model is written file by file into `out` with config.json last, so a directory with config.json is
complete. `train_state/` holds the optimizer, the data position (epoch, batches consumed), the momentum
encoders and queues, the GradScaler and every rank's RNG states; the LR is a pure function of the position.
SIGTERM/SIGINT ask for a checkpoint at the next step boundary and a clean return (cluster pre-emption).

Schedules follow the original: pretrain warms up linearly from warmup_lr over `warmup_steps` optimizer steps,
then decays lr * decay_rate^epoch floored at min_lr; fine-tunes use a cosine to min_lr per epoch (per step
when `train.max_steps` is set). The distillation weight alpha ramps linearly over `loss.alpha_ramp_epochs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from blip import distributed as D
from blip.checkpoint import load_model, load_weights, replace_dir, save_checkpoint
from blip.config import BlipConfig, model_config
from blip.data.shards import SampleStats
from blip.errors import InputError
from blip.model.blip import BLIP
from blip.model.momentum import Momentum
from blip.tasks import CaptionerTask, FilterTask, PretrainTask
from blip.tokenizer import Tokenizer
from blip.train_config import TrainConfig

LogFn = Callable[[dict[str, Any]], None]
LoaderFn = Callable[..., Iterable[dict[str, Any]]]
"""`loader_fn(epoch=, skip_batches=, rank=, world_size=)` -> batches like blip.data's loader (tests, custom data)."""

LAYOUT = {"pretrain": (True, True), "captioner": (False, True), "filter": (True, False)}
"""(text encoder, text decoder) of the model each task trains and saves."""
STATE_DIR = "train_state"
LATEST = "latest"


@dataclasses.dataclass
class Position:
    """Where the run is; saved in every checkpoint."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    batches_in_epoch: int = 0
    """Micro-batches this rank consumed in the current epoch (the loader's skip_batches on resume)."""
    micro_step: int = 0
    """Micro-batches consumed since the start (seeds the hard-negative draw, numbers pre-training pairs)."""


# ---- public entry point ------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, on_log: LogFn | None = None, loader_fn: LoaderFn | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary dict. `on_log` gets event dicts on rank 0 only.

    Events: {"event": "start", ...}, {"event": "log", "step", "epoch", "<name>_loss", "lr", "samples_per_s",
    ...}, {"event": "checkpoint", "path", "step"}, {"event": "warning", "message"}, {"event": "end", ...}.
    """
    info = D.init_distributed(cfg.train.device)
    try:
        summary = Trainer(cfg, info, on_log, loader_fn).run()
        D.barrier(info)  # every rank done before any leaves the group (see D.cleanup)
        return summary
    finally:
        D.cleanup(info)


class Trainer:
    def __init__(self, cfg: TrainConfig, info: D.DistInfo, on_log: LogFn | None, loader_fn: LoaderFn | None):
        if not cfg.train.out:
            raise InputError("train.out: an output directory is required (--out DIR)")
        if not cfg.data.train and loader_fn is None:
            raise InputError("data.train: no training data given (--data SHARDS... or a dataset name)")
        self.cfg, self.info, self.loader_fn = cfg, info, loader_fn
        self._on_log = on_log
        self.out = Path(cfg.train.out).expanduser()
        self.pos = Position()
        self.stop_signal: int | None = None
        self.tb = None
        self.batches_per_epoch: int | None = None
        self.window = _Window()
        self.last_checkpoint: Path | None = None
        self.last_log: dict[str, Any] = {}
        self._source: Any = None
        self.data_stats = SampleStats()
        """Good and bad (skipped, by reason) samples this rank's loader reported since the (re)start."""

    # ---- logging --------------------------------------------------------------------------------------------
    def emit(self, record: dict[str, Any]) -> None:
        if self.info.is_main and self._on_log is not None:
            self._on_log(record)

    def warn(self, message: str) -> None:
        self.emit({"event": "warning", "message": message})

    # ---- the run --------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        resume_dir = self.resolve_resume()
        _seed_everything(cfg.train.seed)  # identical model init on every rank
        self.model, self.tok = self.build_model(resume_dir)
        self.model.to(info.device)
        self.momentum = self.build_momentum()
        self.task = self.build_task()
        self.optimizer = self.build_optimizer()
        self.amp_dtype, self.scaler = self.build_precision()
        rng_states = None
        if resume_dir is not None:
            rng_states = self.load_train_state(resume_dir)
        if cfg.model.compile:
            self.compile()
        self.ddp = self.wrap_ddp()
        self.batches_per_epoch = self.count_batches() if self.batches_per_epoch is None else self.batches_per_epoch
        if info.is_main:
            self.prepare_out(resumed=resume_dir is not None)
        self.emit(
            {
                "event": "start",
                "task": cfg.task,
                "out": str(self.out),
                "resumed_from": str(resume_dir) if resume_dir else None,
                "step": self.pos.step,
                "total_steps": self.total_steps(),
                "steps_per_epoch": self.steps_per_epoch(),
                "world_size": info.world_size,
                "global_batch": cfg.data.batch_size * info.world_size * cfg.optim.accum_steps,
                "params": sum(p.numel() for p in self.model.parameters()),
                "device": str(info.device),
                "precision": str(self.amp_dtype).removeprefix("torch."),
            }
        )
        old_handlers = self.install_signal_handlers()
        try:
            finished = self.loop(rng_states)
        finally:
            self.restore_signal_handlers(old_handlers)
            if self.tb is not None:
                self.tb.close()
        result = {
            "out": str(self.out),
            "task": cfg.task,
            "step": self.pos.step,
            "epoch": self.pos.epoch,
            "interrupted": None if finished else signal.Signals(self.stop_signal).name,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "final": str(self.out) if finished else None,
            "last": self.last_log,
            "data": self.gathered_data_stats(),
        }
        self.emit({"event": "end", **result})
        return result

    def loop(self, rng_states: list[dict] | None) -> bool:
        """Train until epochs or max_steps are done (True) or a stop signal arrives (False)."""
        cfg, info, pos = self.cfg, self.info, self.pos
        accum = cfg.optim.accum_steps
        self.window = _Window()
        self.ddp.train()
        if rng_states is None:
            _seed_everything(cfg.train.seed + info.rank)  # dropout etc. differ per rank, as the original
        while not self.done():
            # a checkpoint taken mid-epoch captured the RNG after this epoch's loader was built (which may draw
            # from the global RNG); one taken at an epoch end, before: restore on the same side of it
            if rng_states is not None and pos.batches_in_epoch == 0:
                rng_states = _restore_rng(rng_states, info.rank, cfg.train.seed)
            batches = iter(self.make_loader(pos.epoch, pos.batches_in_epoch))
            if rng_states is not None:
                rng_states = _restore_rng(rng_states, info.rank, cfg.train.seed)
            exhausted = False
            while not self.done():
                lr = self.set_lr()
                for a in range(accum):
                    raw = next(batches, None)
                    (exhausted,) = D.any_flag(info, raw is None)
                    if exhausted:
                        break
                    self.forward_backward(raw, a, accum)
                if exhausted:
                    self.optimizer.zero_grad(set_to_none=True)  # an incomplete accumulation is dropped
                    break
                self.optimizer_step()
                self.window.steps += 1
                if pos.step % cfg.train.log_every == 0:
                    self.log(lr)
                stop = D.any_flag(info, self.stop_signal is not None)[0]
                if stop or (cfg.train.save_every and pos.step % cfg.train.save_every == 0):
                    self.save_once()
                if stop:
                    self.stop_signal = self.stop_signal or signal.SIGTERM
                    return False
            if exhausted:
                if pos.batches_in_epoch == 0:
                    raise InputError(f"data.train: rank {info.rank} got no complete batch in epoch {pos.epoch}")
                self.batches_per_epoch = pos.batches_in_epoch  # measured: exact from now on
                pos.epoch += 1
                pos.batches_in_epoch = 0
                if not self.done():
                    self.save_once()  # the original saves every epoch
        if self.window.steps:
            self.log(self.current_lr())
        self.save_once()
        self.save_final()
        return True

    def done(self) -> bool:
        c = self.cfg.train
        return self.pos.epoch >= c.epochs or (c.max_steps is not None and self.pos.step >= c.max_steps)

    # ---- one step -------------------------------------------------------------------------------------------
    def forward_backward(self, raw: dict[str, Any], micro: int, accum: int) -> None:
        batch = self.prepare(raw)
        sync = contextlib.nullcontext()
        if self.info.distributed and micro < accum - 1:
            sync = self.ddp.no_sync()
        with sync:
            with torch.autocast(self.info.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
                out = self.ddp(batch, alpha=self.alpha(), step=self.pos.micro_step, update_momentum=micro == 0)
            self.scaler.scale(out["loss"] / accum).backward()
        self.window.add(out)
        self.data_stats.merge(raw.get("stats") or {})
        self.pos.micro_step += 1
        self.pos.batches_in_epoch += 1

    def prepare(self, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loader batch -> task batch: tokenise, move to the device, attach ITC ids."""
        cfg, dev = self.cfg, self.info.device
        ids, mask = self.tok(raw["caption"], max_length=cfg.data.text_length, padding=cfg.data.padding)
        image = raw["image"]
        B = image.shape[0]
        if cfg.task == "filter":
            idx = torch.as_tensor(raw["image_id"], dtype=torch.long)  # captions of one image are positives
        else:  # unique per pair across ranks and steps: only the pair itself is a positive
            gb = B * self.info.world_size
            idx = self.pos.micro_step * gb + self.info.rank * B + torch.arange(B)
        return {
            "image": image.to(dev, non_blocking=True),
            "input_ids": ids.to(dev, non_blocking=True),
            "attention_mask": mask.to(dev, non_blocking=True),
            "idx": idx.to(dev, non_blocking=True),
        }

    def optimizer_step(self) -> None:
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            self.window.grad_norm = float(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.pos.step += 1

    # ---- schedules ------------------------------------------------------------------------------------------
    def current_lr(self) -> float:
        return lr_at(self.cfg, self.pos.step, self.pos.epoch)

    def set_lr(self) -> float:
        lr = self.current_lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def alpha(self) -> float:
        c = self.cfg.loss
        if c.alpha_ramp_epochs <= 0:
            return c.alpha
        per_epoch = self.batches_per_epoch
        if not per_epoch:
            return c.alpha
        progress = (self.pos.epoch + self.pos.batches_in_epoch / per_epoch) / c.alpha_ramp_epochs
        return c.alpha * min(1.0, progress)

    def steps_per_epoch(self) -> int | None:
        if not self.batches_per_epoch:
            return None
        return self.batches_per_epoch // self.cfg.optim.accum_steps

    def total_steps(self) -> int | None:
        c = self.cfg.train
        spe = self.steps_per_epoch()
        by_epochs = spe * c.epochs if spe else None
        if c.max_steps is None:
            return by_epochs
        return min(c.max_steps, by_epochs) if by_epochs else c.max_steps

    # ---- building -------------------------------------------------------------------------------------------
    def resolve_resume(self) -> Path | None:
        """`train.resume`: "auto" = the latest checkpoint in `out` if any; else a checkpoint (or run) dir."""
        r = self.cfg.train.resume
        found: str | None = None
        if self.info.is_main:
            if r in (None, ""):
                if (self.out / LATEST).exists():
                    raise InputError(
                        f"train.out: {self.out} already holds a run; continue it with --resume auto "
                        "(train.resume=auto) or choose another --out"
                    )
            elif r == "auto":
                p = latest_checkpoint(self.out)
                found = str(p) if p else None
            else:
                p = Path(r).expanduser()
                if p.is_dir() and not (p / STATE_DIR).is_dir():
                    p = latest_checkpoint(p) or p  # a run directory: its latest checkpoint
                if not (p / STATE_DIR).is_dir():
                    raise InputError(f"train.resume: {r} is not a checkpoint with {STATE_DIR}/ (or a run dir)")
                found = str(p)
        found = D.broadcast_object(found, self.info)
        if found is None and r == "auto":
            self.warn(f"no checkpoint in {self.out}: starting from scratch")
        return Path(found) if found else None

    def build_model(self, resume_dir: Path | None) -> tuple[BLIP, Tokenizer]:
        """The task's model: from a checkpoint (resume), an init source, or fresh; plus its tokenizer."""
        cfg = self.cfg
        if resume_dir is not None:
            loaded = load_model(resume_dir)
            model = _derive(loaded.model, cfg, str(resume_dir))
            return model, loaded.tokenizer
        if not cfg.model.init and cfg.task != "pretrain":
            name = {"captioner": "finetune-captioner", "filter": "finetune-filter"}[cfg.task]
            raise InputError(f"model.init: {name} starts from a pre-trained model; pass --init SRC")
        if cfg.model.init:
            if cfg.model.text_init or cfg.model.vision_init:
                raise InputError("model.text_init / model.vision_init: only for fresh models (not with --init)")
            loaded = load_model(cfg.model.init, tokenizer=cfg.model.tokenizer)
            src = loaded.model.config
            if cfg.task == "captioner" and not src.text_decoder:
                raise InputError(f"--init {cfg.model.init}: the captioner needs a model with a text decoder")
            if cfg.task == "filter" and not src.text_encoder:
                raise InputError(f"--init {cfg.model.init}: the filter needs a model with a text encoder")
            if cfg.model.patch_size not in (None, src.vision.patch_size):
                raise InputError(
                    f"model.patch_size: {cfg.model.patch_size}, but --init {cfg.model.init} has patches of "
                    f"{src.vision.patch_size} (only fresh models choose it)"
                )
            if cfg.model.stem not in (None, src.vision.stem):
                raise InputError(
                    f"model.stem: {cfg.model.stem!r}, but --init {cfg.model.init} has stem {src.vision.stem!r} "
                    "(only fresh models choose it)"
                )
            model = _derive(loaded.model, cfg, cfg.model.init)
            return model, loaded.tokenizer
        return self.fresh_model()

    def fresh_model(self) -> tuple[BLIP, Tokenizer]:
        from blip.init import init_text_from_bert, init_vision_from_timm

        cfg = self.cfg
        tok = self.fresh_tokenizer()
        enc, dec = LAYOUT[cfg.task]
        mc = model_config(cfg.model.size, vocab_size=len(tok), image_size=cfg.model.image_size)
        if cfg.model.patch_size is not None:
            mc = dataclasses.replace(mc, vision=dataclasses.replace(mc.vision, patch_size=cfg.model.patch_size))
        if cfg.model.stem is not None:
            mc = dataclasses.replace(mc, vision=dataclasses.replace(mc.vision, stem=cfg.model.stem))
        mc = dataclasses.replace(
            mc,
            text_encoder=enc,
            text_decoder=dec,
            pad_token_id=tok.pad_id,
            cls_token_id=tok.cls_id,
            sep_token_id=tok.sep_id,
            bos_token_id=tok.bos_id,
            enc_token_id=tok.enc_id,
        )
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
                raise InputError("data.train: no captions found to train a tokenizer on (pass --tokenizer DIR)")
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
        c = self.cfg.loss
        if self.cfg.task == "captioner" or c.itc <= 0:
            return None  # only ITC uses the momentum encoders and queues
        return Momentum(self.model, queue_size=c.queue_size, momentum=c.momentum).to(self.info.device)

    def build_task(self) -> nn.Module:
        cfg = self.cfg
        c = cfg.loss
        weights = {"itc": c.itc, "itm": c.itm, "lm": c.lm}
        seed = cfg.train.seed
        if cfg.task == "pretrain":
            return PretrainTask(
                self.model, self.momentum, weights, c.negatives_all_ranks, c.label_smoothing, seed, c.hard_negatives
            )
        if cfg.task == "filter":
            return FilterTask(self.model, self.momentum, weights, c.negatives_all_ranks, seed, c.hard_negatives)
        prompt_length = len(self.tok.encode_prompt(cfg.data.prompt)) if cfg.data.prompt else 0
        return CaptionerTask(self.model, prompt_length, c.label_smoothing, seed)

    def build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if _no_weight_decay(name, p) else decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        impl = o.impl
        if impl == "auto":  # fused is also the fastest on CPU (~5x foreach for AdamW in torch 2.x)
            impl = "fused" if self.info.device.type in ("cuda", "cpu") else "foreach"
        kw = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **kw)

    def build_precision(self) -> tuple[torch.dtype, torch.amp.GradScaler]:
        p, dev = self.cfg.train.precision, self.info.device
        if p == "auto":
            p = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[p]
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
        c = self.cfg.loss
        weights = {"pretrain": (c.itc, c.itm, c.lm), "filter": (c.itc, c.itm), "captioner": (c.lm,)}[self.cfg.task]
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

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def prepare_out(self, resumed: bool) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        ck = self.out / "checkpoints"
        if ck.is_dir():
            for junk in ck.glob(".staging-*"):
                shutil.rmtree(junk, ignore_errors=True)  # an interrupted save
        _write_json(self.out / "train_config.json", self.cfg.to_dict())
        metrics = self.out / "metrics.jsonl"
        if resumed and metrics.exists():  # drop lines the killed run logged after its last checkpoint
            keep = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.pos.step]
            metrics.write_text("".join(ln + "\n" for ln in keep))
        elif metrics.exists():
            metrics.unlink()
        if self.cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.pos.step + 1)
            except ImportError:
                self.warn("train.tensorboard: the tensorboard package is not installed (pip install tensorboard)")

    def save_once(self) -> None:
        """Save unless this exact position was just saved (an epoch end right after a periodic save)."""
        if self.last_checkpoint != self.out / "checkpoints" / _step_name(self.pos.step):
            self.save()

    def save(self) -> Path:
        """Every rank calls this; rank 0 writes `checkpoints/step_N` atomically and moves `latest` to it."""
        t0 = time.perf_counter()
        rng = D.all_gather_object(_get_rng_state(), self.info)
        path = self.out / "checkpoints" / _step_name(self.pos.step)
        if self.info.is_main:
            staging = self.out / "checkpoints" / f".staging-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            tmp = save_checkpoint(self.model, self.tok, staging / path.name, extra=self.checkpoint_meta())
            st = tmp / STATE_DIR
            st.mkdir()
            state = {
                "position": dataclasses.asdict(self.pos),
                "batches_per_epoch": self.batches_per_epoch,
                "world_size": self.info.world_size,
                "batch_size": self.cfg.data.batch_size,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "momentum": self.momentum.state_dict() if self.momentum is not None else None,
            }
            torch.save(state, st / "state.pt")
            torch.save(rng, st / "rng.pt")
            _write_json(tmp / "train_config.json", self.cfg.to_dict())
            replace_dir(tmp, path)
            shutil.rmtree(staging, ignore_errors=True)
            _write_text_atomic(self.out / LATEST, f"checkpoints/{path.name}\n")
            self.prune()
            self.emit({"event": "checkpoint", "path": str(path), "step": self.pos.step})
        D.barrier(self.info)
        self.last_checkpoint = path
        self.window.t0 += time.perf_counter() - t0  # samples/s counts training time only
        return path

    def prune(self) -> None:
        keep = self.cfg.train.keep_checkpoints
        if keep <= 0:
            return
        steps = sorted((self.out / "checkpoints").glob("step_*"), key=_step_of)
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"train": {"task": self.cfg.task, "step": self.pos.step, "epoch": self.pos.epoch}}

    def save_final(self) -> None:
        """The final model, loadable as `out` itself: files moved in one by one, config.json last."""
        if self.info.is_main:
            tmp = save_checkpoint(self.model, self.tok, self.out / f".final-{os.getpid()}", self.checkpoint_meta())
            _write_json(tmp / "train_config.json", self.cfg.to_dict())
            (self.out / "config.json").unlink(missing_ok=True)  # incomplete until the new one lands
            for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
                os.replace(f, self.out / f.name)
            shutil.rmtree(tmp, ignore_errors=True)
        D.barrier(self.info)

    def load_train_state(self, ckpt: Path) -> list[dict] | None:
        st = ckpt / STATE_DIR
        try:
            state = torch.load(st / "state.pt", map_location="cpu", weights_only=False)
            rng = torch.load(st / "rng.pt", map_location="cpu", weights_only=False)
        except FileNotFoundError as e:
            raise InputError(f"train.resume: {ckpt} is incomplete ({e.filename} missing)") from None
        self.pos = Position(**state["position"])
        self.batches_per_epoch = state["batches_per_epoch"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.momentum is not None:
            if state["momentum"] is None:
                raise InputError(f"train.resume: {ckpt} has no momentum encoders (written by another task?)")
            self.momentum.load_state_dict(state["momentum"])
        old = (state["world_size"], state["batch_size"])
        new = (self.info.world_size, self.cfg.data.batch_size)
        if old != new:  # keep the data position in samples; the continuation is then not bit-exact
            seen = self.pos.batches_in_epoch * old[0] * old[1]
            self.pos.batches_in_epoch = seen // (new[0] * new[1])
            self.warn(f"resuming with world_size x batch_size {new} instead of {old}: data position approximated")
            return None
        return rng

    # ---- logging --------------------------------------------------------------------------------------------
    def gathered_data_stats(self) -> dict[str, int]:
        """Sample counts of every rank's loader, merged (`{"good", "bad", <reason>: n}`)."""
        merged = SampleStats()
        for d in D.all_gather_object(self.data_stats.as_dict(), self.info):
            merged.merge(d)
        return merged.as_dict()

    def log(self, lr: float) -> None:
        w = self.window
        values = D.all_reduce_mean({**w.means(), "bad_samples": float(self.data_stats.total_bad)}, self.info)
        values["bad_samples"] = round(values["bad_samples"] * self.info.world_size)
        if not values["bad_samples"]:
            del values["bad_samples"]
        elapsed = time.perf_counter() - w.t0
        samples = w.micro * self.cfg.data.batch_size * self.info.world_size
        record = {
            "step": self.pos.step,
            "epoch": self.pos.epoch,
            **{k: v if k == "bad_samples" else round(v, 6) for k, v in values.items()},
            "lr": lr,
            "alpha": round(self.alpha(), 6) if self.momentum is not None else None,
            "samples_per_s": round(samples / elapsed, 3) if elapsed > 0 else None,
        }
        if w.grad_norm is not None:  # "inf" when fp16 overflowed (the GradScaler skipped that step)
            record["grad_norm"] = round(w.grad_norm, 4) if math.isfinite(w.grad_norm) else "inf"
        record = {k: v for k, v in record.items() if v is not None}
        self.last_log = record
        if self.info.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tb is not None:
                for k, v in record.items():
                    if k not in ("step", "epoch") and isinstance(v, int | float):
                        self.tb.add_scalar(f"train/{k}", v, self.pos.step)
        self.emit({"event": "log", **record, "total_steps": self.total_steps()})
        self.window = _Window()

    # ---- signals --------------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> dict[int, Any] | None:
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum: int, frame: Any) -> None:
            if self.stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self.stop_signal = signum
            self.warn(f"{signal.Signals(signum).name}: saving a checkpoint at the next step boundary, then stopping")

        return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore_signal_handlers(self, old: dict[int, Any] | None) -> None:
        for s, h in (old or {}).items():
            signal.signal(s, h)


# ---- helpers -----------------------------------------------------------------------------------------------------
class _Window:
    """Loss sums between two log steps, kept on the device (no per-step host sync)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro = 0
        self.steps = 0
        self.grad_norm: float | None = None
        self.t0 = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor]) -> None:
        for k, v in out.items():
            if k.endswith(("_loss", "_acc")) or k == "loss":
                v = v.detach().float()
                self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.micro += 1

    def means(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        vals = torch.stack([self.sums[k] for k in keys]).cpu().tolist()  # one host sync per log step
        return {k: v / self.micro for k, v in zip(keys, vals, strict=True)}


def lr_at(cfg: TrainConfig, step: int, epoch: int) -> float:
    """Learning rate before optimizer step `step` (0-based) in `epoch` (see the module doc)."""
    o, t = cfg.optim, cfg.train
    if o.schedule == "step":
        lr = max(o.min_lr, o.lr * o.decay_rate**epoch)
    elif o.schedule == "cosine":
        progress = step / t.max_steps if t.max_steps else epoch / max(t.epochs, 1)
        lr = o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    else:
        lr = o.lr
    if step < o.warmup_steps:
        lr = min(lr, o.warmup_lr + (o.lr - o.warmup_lr) * step / o.warmup_steps)
    return lr


def _no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, norm weights, temp (ndim < 2) and position / class embeddings are not decayed."""
    return p.ndim < 2 or name.endswith(("pos_embed", "cls_token", "position_embeddings.weight"))


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
    enc, dec = LAYOUT[cfg.task]
    mc = dataclasses.replace(src.config, text_encoder=enc, text_decoder=dec, share_text=enc and dec)
    model = BLIP(_apply_model_overrides(mc, cfg))
    load_weights(model, src.state_dict(), where, strict=False)
    return model


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint named by `run_dir/latest`, else the highest step_* directory, else None."""
    pointer = run_dir / LATEST
    if pointer.exists():
        p = run_dir / pointer.read_text().strip()
        if (p / STATE_DIR).is_dir():
            return p
    steps = sorted((p for p in (run_dir / "checkpoints").glob("step_*") if (p / STATE_DIR).is_dir()), key=_step_of)
    return steps[-1] if steps else None


def _step_name(step: int) -> str:
    return f"step_{step:06d}"


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _get_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(states: list[dict], rank: int, seed: int) -> None:
    """This rank's saved RNG states (or a fresh per-rank seed when the checkpoint has none for it)."""
    if rank >= len(states):
        _seed_everything(seed + rank)
        return None
    _set_rng_state(states[rank])
    return None


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_json(path: Path, obj: Any) -> None:
    _write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
