"""`pretrain`, `finetune-captioner`, `finetune-filter`: thin wrappers over `blip.train.train`.

The `run_*` functions are what the recipe runner calls in-process; the Typer commands parse flags, the
`--config FILE.toml` and trailing `KEY=VALUE` overrides, and draw a progress bar from the training events.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from blip.config import deep_merge
from blipctl._common import err, guarded, is_rank0, progress
from blipctl.overrides import load_toml, parse_overrides

LogFn = Callable[[dict[str, Any]], None]
COMMANDS = {"pretrain": "pretrain", "captioner": "finetune-captioner", "filter": "finetune-filter"}
LOSS_ABBR = {"itc_loss": "itc", "itm_loss": "itm", "lm_loss": "lm"}


# ---- in-process API ----------------------------------------------------------------------------------------------
def build_train_config(
    task: str,
    *,
    data: list[str] | str | dict[str, Any] | None = None,
    out: str | None = None,
    model_size: str | None = None,
    init: str | None = None,
    resume: str | None = None,
    tokenizer: str | None = None,
    config: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    max_steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    model: dict[str, Any] | None = None,
    optim: dict[str, Any] | None = None,
    loss: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    overwrite: bool = False,
):
    """Merge, lowest first: task defaults < config file < section tables < flags < KEY=VALUE overrides.

    `data` is the training data (shard specs or a dataset name), or a whole `data` table (a dict).
    `overrides` is a list of "KEY=VALUE" strings or an already nested dict.
    """
    from blip.train_config import build_config

    d: dict[str, Any] = load_toml(config) if config else {}
    sections = {"model": model, "optim": optim, "loss": loss, "train": train}
    if isinstance(data, dict):
        sections["data"] = data
    d = deep_merge(d, {k: v for k, v in sections.items() if v})
    flags: dict[str, dict[str, Any]] = {"data": {}, "model": {}, "train": {}}
    if isinstance(data, str):
        data = [data]
    if isinstance(data, list) and data:
        flags["data"]["train"] = data
    if batch_size is not None:
        flags["data"]["batch_size"] = batch_size
    for key, value in (("size", model_size), ("init", init), ("tokenizer", tokenizer)):
        if value is not None:
            flags["model"][key] = value
    for key, value in (("out", out), ("resume", resume), ("max_steps", max_steps), ("epochs", epochs)):
        if value is not None:
            flags["train"][key] = value
    if overwrite:
        flags["train"]["overwrite"] = True
    d = deep_merge(d, {k: v for k, v in flags.items() if v})
    d = deep_merge(d, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return build_config(task, d)


def run_training(task: str, on_log: LogFn | None = None, **kwargs: Any) -> dict[str, Any]:
    from blip.train import train

    return train(build_train_config(task, **kwargs), on_log=on_log)


def run_pretrain(
    data: list[str] | str | dict[str, Any] | None = None,
    out: str | None = None,
    model_size: str | None = None,
    init: str | None = None,
    resume: str | None = None,
    tokenizer: str | None = None,
    config: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    max_steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    model: dict[str, Any] | None = None,
    optim: dict[str, Any] | None = None,
    loss: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    on_log: LogFn | None = None,
) -> dict[str, Any]:
    """Pre-train (ITC + ITM + LM); returns the run summary (see blip.train.train)."""
    kw = {k: v for k, v in locals().items() if k != "on_log"}
    return run_training("pretrain", on_log=on_log, **kw)


def run_finetune_captioner(
    init: str | None = None,
    data: list[str] | str | dict[str, Any] | None = None,
    out: str | None = None,
    resume: str | None = None,
    tokenizer: str | None = None,
    config: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    max_steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    model: dict[str, Any] | None = None,
    optim: dict[str, Any] | None = None,
    loss: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    on_log: LogFn | None = None,
) -> dict[str, Any]:
    """Fine-tune a captioner (LM with the prompt masked); saves a decoder-only model."""
    kw = {k: v for k, v in locals().items() if k != "on_log"}
    return run_training("captioner", on_log=on_log, **kw)


def run_finetune_filter(
    init: str | None = None,
    data: list[str] | str | dict[str, Any] | None = None,
    out: str | None = None,
    resume: str | None = None,
    tokenizer: str | None = None,
    config: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    max_steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    model: dict[str, Any] | None = None,
    optim: dict[str, Any] | None = None,
    loss: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    on_log: LogFn | None = None,
) -> dict[str, Any]:
    """Fine-tune a filter (ITC + ITM with image-id positives); saves an encoder-only model."""
    kw = {k: v for k, v in locals().items() if k != "on_log"}
    return run_training("filter", on_log=on_log, **kw)


# ---- progress ----------------------------------------------------------------------------------------------------
class ProgressPrinter:
    """Training events -> a rich progress bar on a terminal, plain log lines otherwise (cluster logs)."""

    def __init__(self, name: str):
        self.name = name
        self.bar = progress()
        self.task_id = None

    def __enter__(self) -> ProgressPrinter:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, r: dict[str, Any]) -> None:
        ev = r.get("event")
        if ev == "start":
            resumed = f", resumed from {r['resumed_from']}" if r.get("resumed_from") else ""
            err.print(
                f"[bold]{self.name}[/]: {r['params'] / 1e6:.1f}M params on {r['device']} ({r['precision']}), "
                f"{r['world_size']} process(es), global batch {r['global_batch']}{resumed}",
                highlight=False,
            )
            self.task_id = self.bar.add_task(self.name, total=r.get("total_steps"), completed=r["step"], rate="")
        elif ev == "log":
            text = self.describe(r)
            if self.bar.disable:
                err.print(f"step {r['step']}/{r.get('total_steps') or '?'}  {text}", highlight=False)
            elif self.task_id is not None:
                self.bar.update(self.task_id, completed=r["step"], total=r.get("total_steps"), rate=text)
        elif ev == "checkpoint":
            if self.bar.disable:
                err.print(f"[dim]checkpoint: {r['path']}[/]", highlight=False)
        elif ev == "warning":
            err.print(f"[yellow]warning:[/] {r['message']}", highlight=False)
        elif ev == "info":
            err.print(f"[dim]{r['message']}[/]", highlight=False)

    @staticmethod
    def describe(r: dict[str, Any]) -> str:
        parts = [f"{abbr} {r[k]:.3f}" for k, abbr in LOSS_ABBR.items() if k in r]
        if not parts and "loss" in r:  # pretrain-vision: the summed head losses, then held-out accuracy per head
            parts = [f"loss {r['loss']:.3f}"]
            parts += [f"{k[4:-4]} {v:.3f}" for k, v in r.items() if k.startswith("val_") and k.endswith("_acc")]
        parts.append(f"lr {r['lr']:.2e}")
        if r.get("samples_per_s") is not None:
            parts.append(f"{r['samples_per_s']:.1f} samples/s")
        return "  ".join(parts)


# ---- Typer commands ----------------------------------------------------------------------------------------------
DataOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--data",
        help="Training data: shard dir / glob / brace pattern (repeat --data for more), or for the fine-tunes "
        "coco | flickr30k | an annotation JSON.",
    ),
]
OutOpt = Annotated[str | None, typer.Option("--out", help="Output dir (final model, checkpoints/, metrics.jsonl).")]
InitOpt = Annotated[
    str | None, typer.Option("--init", help="Start from this model: blipctl dir, Hugging Face BLIP dir or .pth.")
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Start in a non-empty --out that is not a training run: the run's files are written into it, nothing "
        "else is deleted.",
    ),
]
ResumeOpt = Annotated[
    str | None,
    typer.Option("--resume", help="auto (the latest checkpoint in --out, if any) or a checkpoint dir."),
]
TokenizerOpt = Annotated[str | None, typer.Option("--tokenizer", help="Tokenizer dir (vocab.txt / tokenizer.json).")]
ConfigOpt = Annotated[
    str | None, typer.Option("--config", help="A TOML file of config tables (\\[optim], \\[data], ...).")
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="KEY=VALUE config overrides (TOML values), e.g. optim.lr=1e-4 train.max_steps=1000."),
]

_EPILOG = """
[bold]Examples[/]

  blipctl {cmd} {example}

  torchrun --nproc_per_node 8 -m blipctl {cmd} {example_short} data.batch_size=32

  blipctl {cmd} {example_short} --resume auto        [dim]# continue after a crash or pre-emption[/]

[bold]Config[/] (defaults of this command; change any with KEY=VALUE or --config FILE.toml)

{defaults}

[bold]Output[/]: OUT/ is the final model (use it as --model / --init), plus OUT/checkpoints/step_N (with
train_state/ for exact resume), OUT/latest, OUT/metrics.jsonl and OUT/train_config.json. SIGTERM / Ctrl-C
save a checkpoint at the next step and stop (exit 143 / 130); rerun with --resume auto.
"""

_EXAMPLES = {
    "pretrain": (
        "--data 'shards/{00000..00099}.tar' --out runs/pt --model-size base",
        "--data shards/ --out runs/pt",
    ),
    "captioner": (
        "--init runs/pt --data coco --out runs/cap data.data_root=/data/coco",
        "--init runs/pt --data coco --out runs/cap",
    ),
    "filter": (
        "--init runs/pt --data coco --out runs/filter",
        "--init runs/pt --data coco --out runs/filter",
    ),
}


def _defaults_text(task: str) -> str:
    from blip.train_config import task_defaults

    d = task_defaults(task)
    hide = {"train": {"out", "resume"}, "data": {"train"}}
    lines = []
    for section in ("model", "data", "optim", "loss", "train"):
        items = [f"{k}={_fmt(v)}" for k, v in d[section].items() if k not in hide.get(section, set())]
        lines.append(f"  [bold]{section}[/]: " + ", ".join(items))
    return "\n\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def _epilog(task: str) -> str:
    ex, short = _EXAMPLES[task]
    return _EPILOG.format(cmd=COMMANDS[task], example=ex, example_short=short, defaults=_defaults_text(task))


def _split_positional(args: list[str] | None) -> tuple[list[str], list[str]]:
    """Trailing arguments: KEY=VALUE overrides, and existing paths (a shell-expanded --data glob)."""
    overrides, paths = [], []
    for a in args or []:
        (paths if "=" not in a and Path(a).exists() else overrides).append(a)
    return overrides, paths


def _cli_run(task: str, data: list[str] | None, args: list[str] | None, **kw: Any) -> None:
    from blip.errors import InputError

    overrides, extra_paths = _split_positional(args)
    if extra_paths and not data:
        raise InputError(f"unexpected argument {extra_paths[0]!r}: expected KEY=VALUE (did you mean --data?)")
    data = (data or []) + extra_paths
    cfg = build_train_config(task, data=data or None, overrides=overrides, **kw)
    from blip.train import train

    is_main = is_rank0()
    with ProgressPrinter(COMMANDS[task]) as printer:
        result = train(cfg, on_log=printer if is_main else None)
    if result["interrupted"]:
        if is_main:
            err.print(
                f"[yellow]stopped by {result['interrupted']}[/] at step {result['step']}; checkpoint "
                f"{result['checkpoint']}. Continue with: --resume auto",
                highlight=False,
            )
        raise typer.Exit(130 if result["interrupted"] == "SIGINT" else 143)
    data = result.get("data") or {}
    if is_main and data.get("bad"):
        reasons = ", ".join(f"{v} {k}" for k, v in data.items() if k not in ("good", "bad"))
        err.print(f"[yellow]data:[/] {data['bad']} bad samples skipped ({reasons})", highlight=False)
    if is_main:
        last = result.get("last") or {}
        losses = ProgressPrinter.describe(last) if "lr" in last else ""
        err.print(f"[green]done[/]: step {result['step']}  {losses}\nmodel: {result['final']}", highlight=False)


CONFIG_FLAGS = {
    "model.init": "--init",
    "model.tokenizer": "--tokenizer",
    "model.size": "--model-size",
    "data.train": "--data",
    "train.out": "--out",
    "train.resume": "--resume",
    "train.overwrite": "--overwrite",
}
"""Config keys the training commands also take as flags: library errors naming them are told with the flag."""


def train_guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    return guarded(fn, CONFIG_FLAGS)


def register(app: typer.Typer) -> None:
    ctx = {"help_option_names": ["-h", "--help"]}

    @app.command("pretrain", epilog=_epilog("pretrain"), context_settings=ctx)
    @train_guarded
    def pretrain(
        data: DataOpt = None,
        out: OutOpt = None,
        model_size: Annotated[
            str | None, typer.Option("--model-size", help="Fresh model size: tiny | base | large (default base).")
        ] = None,
        init: InitOpt = None,
        resume: ResumeOpt = None,
        tokenizer: TokenizerOpt = None,
        config: ConfigOpt = None,
        overwrite: OverwriteOpt = False,
        overrides: OverridesArg = None,
    ) -> None:
        """Pre-train BLIP on image-text shards: ITC (momentum distillation) + ITM (hard negatives) + LM.

        A fresh model gets a tokenizer trained on the captions unless --tokenizer (or model.text_init, a local
        BERT dir) gives one. Defaults are the original BLIP's (lr 3e-4 warmup 3000 steps, decay 0.9/epoch,
        batch 75 per process, 224 px, queue 57600, 20 epochs).
        """
        _cli_run(
            "pretrain", data, overrides, out=out, model_size=model_size, init=init, resume=resume,
            tokenizer=tokenizer, config=config, overwrite=overwrite,
        )  # fmt: skip

    @app.command("finetune-captioner", epilog=_epilog("captioner"), context_settings=ctx)
    @train_guarded
    def finetune_captioner(
        init: InitOpt = None,
        data: DataOpt = None,
        out: OutOpt = None,
        resume: ResumeOpt = None,
        tokenizer: TokenizerOpt = None,
        config: ConfigOpt = None,
        overwrite: OverwriteOpt = False,
        overrides: OverridesArg = None,
    ) -> None:
        """Fine-tune the CapFilt captioner: LM loss on prompt + caption ("a picture of " not trained on).

        Saves a decoder-only model (for `blipctl caption` and `capfilt --captioner`). Defaults are the
        original's caption_coco.yaml: lr 1e-5 cosine, 5 epochs, batch 32, 384 px, text length 40.
        """
        _cli_run(
            "captioner",
            data,
            overrides,
            out=out,
            init=init,
            resume=resume,
            tokenizer=tokenizer,
            config=config,
            overwrite=overwrite,
        )

    @app.command("finetune-filter", epilog=_epilog("filter"), context_settings=ctx)
    @train_guarded
    def finetune_filter(
        init: InitOpt = None,
        data: DataOpt = None,
        out: OutOpt = None,
        resume: ResumeOpt = None,
        tokenizer: TokenizerOpt = None,
        config: ConfigOpt = None,
        overwrite: OverwriteOpt = False,
        overrides: OverridesArg = None,
    ) -> None:
        """Fine-tune the CapFilt filter: ITC (captions of one image are all positives) + ITM hard negatives.

        Saves an encoder-only model (for `blipctl score`, `eval-retrieval` and `capfilt --filter`). Defaults are
        the original's retrieval_coco.yaml: lr 1e-5 cosine, 6 epochs, batch 32, 384 px, text length 35, ViT
        gradient checkpointing on 4 blocks, negatives from all ranks.
        """
        _cli_run(
            "filter",
            data,
            overrides,
            out=out,
            init=init,
            resume=resume,
            tokenizer=tokenizer,
            config=config,
            overwrite=overwrite,
        )
