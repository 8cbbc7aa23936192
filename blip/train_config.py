"""Training configuration: one dataclass schema for pre-training and both fine-tunes, defaults per task.

The defaults are the original BLIP's (configs/pretrain.yaml, caption_coco.yaml, retrieval_coco.yaml and the
constants in the code). A run's config is `task_defaults(task)` with a user dict merged over it and checked
by `blip.config.from_dict`, so an unknown key or a wrong type raises InputError naming the key. The resolved
config is saved beside every checkpoint as `train_config.json`.

TOML and KEY=VALUE parsing live in the CLI (`blipctl/overrides.py`); this module only takes plain dicts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from blip.config import deep_merge, from_dict
from blip.data.swaps import WordSwapper
from blip.errors import InputError

Task = Literal["pretrain", "captioner", "filter"]
TASKS: tuple[str, ...] = ("pretrain", "captioner", "filter")


@dataclass(kw_only=True)
class ModelArgs:
    size: Literal["tiny", "base", "large"] = "base"
    """Size of a fresh model (ignored when `init` is given)."""
    init: str | None = None
    """Start from this model: a blipctl checkpoint dir, a Hugging Face BLIP dir or an original .pth file."""
    tokenizer: str | None = None
    """Tokenizer dir (vocab.txt / tokenizer.json). Default: the init model's, else `text_init`'s, else trained."""
    tokenizer_vocab: int = 8000
    """Vocabulary size when a tokenizer is trained on the training captions (fresh models without one)."""
    tokenizer_samples: int = 200_000
    """At most this many captions are read to train that tokenizer."""
    text_init: str | None = None
    """Fresh pre-training only: a local Hugging Face BERT dir whose weights initialise the text transformer."""
    vision_init: str | None = None
    """Fresh pre-training only: a timm model name (needs network), a .pth/.safetensors timm ViT state dict, or a
    `blipctl pretrain-vision` output dir (then `stem`, `patch_size` and the size must match the tower's)."""
    image_size: int = 224
    patch_size: int | None = None
    """Fresh models only: the ViT patch size (None keeps the size's 16). Smaller patches see finer detail at the
    same image size, for more compute."""
    stem: Literal["none", "conv"] | None = None
    """Fresh models only: "conv" puts a small convolutional stem in front of the ViT instead of BLIP's patch
    projection (see blip.config.VisionConfig.stem; such models cannot be exported to HF or .pth); None keeps "none"."""
    grad_ckpt_layers: int = 0
    """Activation-checkpoint the last N ViT blocks (saves memory, costs a re-forward)."""
    dropout: float | None = None
    """Text dropout; None keeps the size's default (0.1 for base/large, 0 for tiny) or the init model's."""
    drop_path: float | None = None
    """ViT stochastic depth; None keeps the default."""
    compile: bool = False
    """torch.compile the ViT and text layers (GPU; the first steps are slow while compiling)."""


@dataclass(kw_only=True)
class DataArgs:
    train: list[str] = field(default_factory=list)
    """Training data: shard specs (dir, glob, brace pattern), or coco | flickr30k | an annotation JSON."""
    data_root: str | None = None
    """Root of coco/flickr30k (annotations/ + images); default $BLIP_DATA."""
    batch_size: int = 75
    """Per process (per GPU), as the original configs."""
    num_workers: int = 2
    text_length: int = 30
    """Max text tokens (incl. [CLS]/[SEP]): 30 pretrain, 40 captioner, 35 filter."""
    padding: Literal["max_length", "longest"] = "max_length"
    max_words: int = 30
    """Captions are cut to this many words (pre_caption)."""
    min_scale: float = 0.2
    """RandomResizedCrop minimum scale (0.2 pretrain, 0.5 fine-tunes)."""
    randaugment: bool = True
    hflip: bool = True
    """Random horizontal flip (the original's default; turn off when captions name left/right, as the demo's)."""
    prompt: str = ""
    """Prepended to every caption; its tokens are not trained on (captioner: "a picture of ")."""
    strict: bool = False
    """Bad samples are fatal instead of skipped and counted."""
    num_samples: int | None = None
    """Pairs per epoch over all ranks; None: counted once (needed for the alpha ramp and the progress bar)."""
    shuffle_buffer: int = 1000
    """Shards: pairs each loader worker shuffles among (shards are read in a shuffled order, so batches mix only the
    few shards the buffer spans). With few large shards, batches come in runs from one shard and each source's share
    of a short run depends on the seed: a buffer as large as the data is a full shuffle (decoded images: mind RAM)."""


@dataclass(kw_only=True)
class OptimArgs:
    lr: float = 3e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    """AdamW decay; biases, norms, position/cls embeddings and temp are never decayed."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Literal["step", "cosine", "constant"] = "step"
    """step: max(min_lr, lr * decay_rate^epoch) (pretrain). cosine: to min_lr, per epoch as the original,
    per step when train.max_steps is set. constant: lr throughout (after warmup)."""
    warmup_steps: int = 3000
    """Linear warmup warmup_lr -> lr over this many optimizer steps."""
    warmup_lr: float = 1e-6
    decay_rate: float = 0.9
    accum_steps: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
    grad_clip: float = 0.0
    """Clip the global grad norm to this value; 0 disables."""
    vision_lr_scale: float = 1.0
    """The vision tower's learning rate as a fraction of `lr`. 0 locks it (LiT, Zhai et al. 2022): no gradients,
    BatchNorm statistics kept, a cheaper step; for a tower pre-trained on labels that later training would erode."""
    impl: Literal["auto", "fused", "foreach", "for"] = "auto"
    """AdamW kernel: auto = fused (on GPU and CPU; foreach elsewhere)."""


@dataclass(kw_only=True)
class LossArgs:
    itc: float = 1.0
    """Weight of the image-text contrastive loss (0 disables it)."""
    itm: float = 1.0
    lm: float = 1.0
    queue_size: int = 57600
    """ITC negatives kept from earlier batches (momentum features); 0 = in-batch negatives only, which learns far
    faster from scratch (no pre-trained towers) at small batch sizes, such as the laptop demo."""
    momentum: float = 0.995
    alpha: float = 0.4
    """Momentum-distillation weight, reached after `alpha_ramp_epochs`."""
    alpha_ramp_epochs: float = 2.0
    """Linear ramp of alpha from 0 (pretrain: 2 epochs; filter: 1)."""
    negatives_all_ranks: bool = False
    """Sample ITM hard negatives from the whole global batch instead of the local one."""
    hard_negatives: float = 1.0
    """ITM negatives are drawn with probability softmax(hard_negatives * ITC similarity): 1 is the original
    (hard negatives), 0 uniform. Lower it when training from scratch on data with many near-duplicates."""
    label_smoothing: float = 0.1
    word_swaps: list[list[str]] = field(default_factory=list)
    """Word classes for one more ITM negative per pair: the caption with one word replaced by another of its class
    (blip.data.swaps), e.g. [["red", "blue"], ["circle|disc", "square|box"]] ("|" joins synonyms). Teaches which
    attribute belongs to which object, which in-batch negatives rarely test. Empty: off (the original)."""


@dataclass(kw_only=True)
class RunArgs:
    out: str = ""
    """Output dir: final model (loadable by --model/--init), checkpoints/, metrics.jsonl, train_config.json."""
    epochs: int = 20
    max_steps: int | None = None
    """Stop after this many optimizer steps (whichever of epochs / max_steps comes first)."""
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda (the local rank's GPU) when available, else cpu."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype; weights and optimizer state stay fp32. auto = bf16 on GPUs that support it and on CPUs with
    native bf16 (AVX512-BF16/AMX), else fp32 (blip.precision). fp16 uses a GradScaler."""
    save_every: int = 1000
    """Checkpoint every N optimizer steps (0: only at epoch ends and at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest N step checkpoints (0 keeps all)."""
    log_every: int = 10
    tensorboard: bool = False
    resume: str | None = None
    """auto (the latest checkpoint in `out`, if any) or a checkpoint dir."""
    overwrite: bool = False
    """Start a run in a non-empty `out` that is not a training run: the run's files are written into it (same
    names replaced), nothing else is deleted. Without it such an `out` is refused."""


@dataclass(kw_only=True)
class TrainConfig:
    task: Task = "pretrain"
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    loss: LossArgs = field(default_factory=LossArgs)
    train: RunArgs = field(default_factory=RunArgs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- per-task defaults (blip-original.md §1) -----------------------------------------------------------------
_FINETUNE = {
    "optim": {"lr": 1e-5, "min_lr": 0.0, "schedule": "cosine", "warmup_steps": 0},
    "data": {"batch_size": 32, "min_scale": 0.5},
    "model": {"image_size": 384},
}
_TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {},
    "captioner": {
        **_FINETUNE,
        "data": {**_FINETUNE["data"], "text_length": 40, "padding": "longest", "prompt": "a picture of "},
        "loss": {"itc": 0.0, "itm": 0.0, "lm": 1.0},
        "train": {"epochs": 5},
    },
    "filter": {
        **_FINETUNE,
        "data": {**_FINETUNE["data"], "text_length": 35},
        "model": {"image_size": 384, "grad_ckpt_layers": 4},
        "loss": {"lm": 0.0, "alpha_ramp_epochs": 1.0, "negatives_all_ranks": True},
        "train": {"epochs": 6},
    },
}


def task_defaults(task: str) -> dict[str, Any]:
    """The default config of a task as a plain dict (what `blipctl ... --help` shows)."""
    if task not in TASKS:
        raise InputError(f"task: unknown task {task!r}; choose one of {', '.join(TASKS)}")
    base = TrainConfig(task=task).to_dict()
    return deep_merge(base, _TASK_DEFAULTS[task])


def build_config(task: str, d: dict[str, Any] | None = None) -> TrainConfig:
    """Task defaults <- `d` (a plain dict, e.g. from TOML + overrides), validated; errors name the key."""
    d = dict(d or {})
    if "task" in d and d["task"] != task:
        raise InputError(f"task: this command runs {task!r}, but the config says {d['task']!r}")
    d.pop("task", None)
    merged = deep_merge(task_defaults(task), d)
    cfg = from_dict(TrainConfig, merged)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Range checks that types alone cannot express; messages name the key."""
    for section in ("model", "data", "optim", "loss", "train"):  # nan passes every `<` check below: refuse it first
        args = getattr(cfg, section)
        for f in dataclasses.fields(args):
            v = getattr(args, f.name)
            if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, list) else [v])):
                raise InputError(f"{section}.{f.name}: must be a finite number, got {v}")
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.text_length": cfg.data.text_length,
        "optim.accum_steps": cfg.optim.accum_steps,
        "model.image_size": cfg.model.image_size,
        "train.log_every": cfg.train.log_every,
    }
    for k, v in positive.items():
        if v < 1:
            raise InputError(f"{k}: must be at least 1, got {v}")
    for k, v in {
        "optim.lr": cfg.optim.lr,
        "optim.min_lr": cfg.optim.min_lr,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.grad_clip": cfg.optim.grad_clip,
        "optim.vision_lr_scale": cfg.optim.vision_lr_scale,
        "train.epochs": cfg.train.epochs,
        "train.save_every": cfg.train.save_every,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "data.num_workers": cfg.data.num_workers,
        "loss.itc": cfg.loss.itc,
        "loss.itm": cfg.loss.itm,
        "loss.lm": cfg.loss.lm,
        "loss.alpha_ramp_epochs": cfg.loss.alpha_ramp_epochs,
        "loss.hard_negatives": cfg.loss.hard_negatives,
    }.items():
        if v < 0:
            raise InputError(f"{k}: must not be negative, got {v}")
    if cfg.model.patch_size is not None and (cfg.model.patch_size < 1 or cfg.model.image_size % cfg.model.patch_size):
        raise InputError(
            f"model.patch_size: must divide model.image_size ({cfg.model.image_size}), got {cfg.model.patch_size}"
        )
    if cfg.train.max_steps is not None and cfg.train.max_steps < 1:
        raise InputError(f"train.max_steps: must be at least 1, got {cfg.train.max_steps}")
    if cfg.data.num_samples is not None and cfg.data.num_samples < 1:
        raise InputError(f"data.num_samples: must be at least 1, got {cfg.data.num_samples}")
    if not 0.0 <= cfg.loss.alpha <= 1.0:
        raise InputError(f"loss.alpha: must be in [0, 1], got {cfg.loss.alpha}")
    if not 0.0 <= cfg.loss.momentum < 1.0:
        raise InputError(f"loss.momentum: must be in [0, 1), got {cfg.loss.momentum}")
    if cfg.data.shuffle_buffer < 1:
        raise InputError(f"data.shuffle_buffer: must be at least 1, got {cfg.data.shuffle_buffer}")
    if not 0.0 < cfg.data.min_scale <= 1.0:
        raise InputError(f"data.min_scale: must be in (0, 1], got {cfg.data.min_scale}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise InputError(f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas}")
    if cfg.model.grad_ckpt_layers < 0:
        raise InputError(f"model.grad_ckpt_layers: must not be negative, got {cfg.model.grad_ckpt_layers}")
    if cfg.loss.queue_size < 0:
        raise InputError(f"loss.queue_size: must not be negative, got {cfg.loss.queue_size}")
    weights = {"pretrain": ("itc", "itm", "lm"), "captioner": ("lm",), "filter": ("itc", "itm")}[cfg.task]
    if all(getattr(cfg.loss, w) == 0 for w in weights):
        raise InputError(f"loss: every loss of task {cfg.task!r} has weight 0 ({', '.join(weights)})")
    if cfg.task == "captioner" and (cfg.loss.itc or cfg.loss.itm):
        raise InputError("loss.itc / loss.itm: the captioner trains the LM loss only (it has no text encoder)")
    if cfg.task == "filter" and cfg.loss.lm:
        raise InputError("loss.lm: the filter trains ITC + ITM only (it has no text decoder)")
    if cfg.loss.word_swaps:
        if cfg.task == "captioner":
            raise InputError("loss.word_swaps: swapped captions are ITM negatives; the captioner has no ITM loss")
        WordSwapper(cfg.loss.word_swaps, key="loss.word_swaps")  # refuses malformed classes, naming the key
