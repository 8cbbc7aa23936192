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
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from blip import distributed as D
from blip.data.shards import SampleStats
from blip.errors import InputError
from blip.train_checkpoint import (  # noqa: F401 - LATEST, STATE_DIR, latest_checkpoint: part of this module's API
    LATEST,
    STATE_DIR,
    Position,
    TrainCheckpoints,
    _restore_rng,
    _seed_everything,
    latest_checkpoint,
)
from blip.train_config import TrainConfig
from blip.train_setup import LAYOUT, TrainSetup  # noqa: F401 - LAYOUT: part of this module's API

LogFn = Callable[[dict[str, Any]], None]
LoaderFn = Callable[..., Iterable[dict[str, Any]]]
"""`loader_fn(epoch=, skip_batches=, rank=, world_size=)` -> batches like blip.data's loader (tests, custom data)."""


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


class Trainer(TrainSetup, TrainCheckpoints):
    """One run: build (TrainSetup), loop (here), checkpoint and resume (TrainCheckpoints)."""

    def __init__(self, cfg: TrainConfig, info: D.DistInfo, on_log: LogFn | None, loader_fn: LoaderFn | None):
        if not cfg.train.out:
            raise InputError("train.out: an output directory is required", param="train.out")
        if not cfg.data.train and loader_fn is None:
            raise InputError("data.train: no training data given (shards or a dataset name)", param="data.train")
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
        if self.cfg.optim.vision_lr_scale == 0:
            self.model.visual_encoder.eval()  # locked: BatchNorm keeps its statistics, dropout and drop-path off
            if self.momentum is not None:
                self.momentum.visual_encoder_m.eval()
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
        """Loader batch -> task batch (the task decides: tokenise, move to the device, attach ITC ids)."""
        info = self.info
        return self.task.prepare(
            raw, self.tok, self.cfg.data, info.device, self.pos.micro_step, info.rank, info.world_size
        )

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
            g["lr"] = lr * g.get("lr_scale", 1.0)
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


from blip._callable import make_callable  # noqa: E402 - `blip.train(cfg)` calls train(cfg)

make_callable(__name__, "train")
