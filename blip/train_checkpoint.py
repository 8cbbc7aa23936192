"""Training checkpoints: save (atomic, every rank's RNG), resume (exact position), prune, and the final model.

    checkpoints/step_000100/        a loadable model (config.json, model.safetensors, tokenizer) + train_config.json
        train_state/state.pt        position, optimizer, GradScaler, momentum encoders and queues
        train_state/rng.pt          every rank's python / numpy / torch (/ cuda) RNG states
    latest                          text file naming the newest checkpoint

Loading training state never unpickles code: `torch.load(weights_only=True)` with an explicit allow-list (the
numpy pieces of numpy's RNG state), so a `state.pt` whose pickle would call a function is refused with an
InputError before anything runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pickle
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blip import distributed as D
from blip.atomic import write_json, write_text
from blip.checkpoint import replace_dir, save_checkpoint
from blip.errors import InputError
from blip.outputs import check_output_dir

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


class TrainCheckpoints:
    """The checkpoint half of blip.train.Trainer (a mixin: it reads the trainer's model, optimizer, position)."""

    def resolve_resume(self) -> Path | None:
        """`train.resume`: "auto" = the latest checkpoint in `out` if any; else a checkpoint (or run) dir."""
        r = self.cfg.train.resume
        found: str | None = None
        if self.info.is_main:
            if r in (None, ""):
                if (self.out / LATEST).exists():
                    raise InputError(
                        f"train.out: {self.out} already holds a run; continue it with train.resume=auto "
                        "or choose another train.out",
                        param=("train.out", "train.resume"),
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
            if found is None:  # a new run: `out` must be empty, missing or a run (blip.outputs)
                check_output_dir(self.out, "run", self.cfg.train.overwrite, param="train.out")
        found = D.broadcast_object(found, self.info)
        if found is None and r == "auto":
            self.warn(f"no checkpoint in {self.out}: starting from scratch")
        return Path(found) if found else None

    def prepare_out(self, resumed: bool) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        ck = self.out / "checkpoints"
        if ck.is_dir():
            for junk in ck.glob(".staging-*"):
                shutil.rmtree(junk, ignore_errors=True)  # an interrupted save
        write_json(self.out / "train_config.json", self.cfg.to_dict())
        metrics = self.out / "metrics.jsonl"
        if resumed and metrics.exists():  # drop lines the killed run logged after its last checkpoint
            keep, torn = _metrics_upto(metrics.read_text(errors="replace"), self.pos.step)
            if torn:
                self.warn(f"{metrics}: dropped {torn} unreadable line(s) (a run killed while writing it)")
            write_text(metrics, "".join(ln + "\n" for ln in keep))
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
            with _writing(path, staging):
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
                _torch_save(state, st / "state.pt")
                _torch_save(rng, st / "rng.pt")
                write_json(tmp / "train_config.json", self.cfg.to_dict())
                replace_dir(tmp, path)
            write_text(self.out / LATEST, f"checkpoints/{path.name}\n")
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
            with _writing(self.out, self.out / f".final-{os.getpid()}") as tmp:
                save_checkpoint(self.model, self.tok, tmp, self.checkpoint_meta())
                write_json(tmp / "train_config.json", self.cfg.to_dict())
                (self.out / "config.json").unlink(missing_ok=True)  # incomplete until the new one lands
                for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
                    os.replace(f, self.out / f.name)
        D.barrier(self.info)

    def load_train_state(self, ckpt: Path) -> list[dict] | None:
        st = ckpt / STATE_DIR
        state = load_state_file(st / "state.pt", ckpt)
        rng = load_state_file(st / "rng.pt", ckpt)
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


# ---- writing -------------------------------------------------------------------------------------------------------
def _torch_save(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def _disk_full(e: BaseException | None) -> bool:
    """A full disk as the writers report it: OSError(ENOSPC); safetensors' 'No space left on device (os error
    28)'; torch.save's zip writer's short write '[enforce fail at inline_container.cc] . unexpected pos N vs M'
    (what it raises on a full tmpfs, through a path or a Python file alike)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        text = str(e)
        if "No space left on device" in text or "os error 28" in text or "unexpected pos" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def _writing(target: Path, scratch: Path) -> Iterator[Path]:
    """Write `target` through the scratch directory `scratch`, which is removed whatever happens; a full disk is
    told as such, naming `target` (the previous checkpoints are untouched: nothing replaces them until the new one
    is complete)."""
    try:
        yield scratch
    except Exception as e:
        if _disk_full(e):
            raise OSError(
                f"no space left on device ({target}): not written; earlier checkpoints are intact. Free space "
                f"(or lower train.keep_checkpoints) and continue with train.resume=auto"
            ) from None
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---- safe loading ------------------------------------------------------------------------------------------------
def _numpy_globals() -> list[Any]:
    """What numpy's RNG state (a uint32 array) needs to unpickle: array reconstruction and its dtype, nothing
    that calls out."""
    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [dtypes.UInt32DType, dtypes.Int64DType, dtypes.Float64DType]
    return allowed


def load_state_file(path: Path, ckpt: Path) -> Any:
    """torch.load with weights_only=True and the numpy allow-list; a missing, corrupt or code-carrying file is an
    InputError naming it (train.resume)."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise InputError(f"train.resume: {ckpt} is incomplete ({e.filename} missing)", param="resume") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"train.resume: {path} is not training state blipctl wrote; refusing to load it ({reason})",
            param="resume",
        ) from None


def _metrics_upto(text: str, step: int) -> tuple[list[str], int]:
    """The metrics.jsonl lines logged at or before `step`, and how many lines did not parse: a run killed while
    appending leaves a torn last line, which must not stop the resume."""
    keep, torn = [], 0
    for ln in text.splitlines():
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            s = rec["step"] if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None
        except (ValueError, RecursionError):
            s = None
        if s is None:
            torn += 1
        elif s <= step:
            keep.append(ln)
    return keep, torn


# ---- positions and RNG -------------------------------------------------------------------------------------------
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
