"""Resuming never unpickles code: a train_state file whose pickle would call os.system is refused (InputError,
CLI exit 2) and nothing runs (DESIGN §10; issue 18 item 1)."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import config_dict, micro_init, synthetic_loader

from blip.errors import InputError
from blip.train import latest_checkpoint, train
from blip.train_config import build_config


class _RunsCode:
    """Unpickling this calls os.system(<touch the marker>)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    init = micro_init(d / "micro")
    out = d / "run"
    cfg = build_config("captioner", config_dict("captioner", init, out, train={"max_steps": 1}))
    train(cfg, loader_fn=synthetic_loader(8, prompt=cfg.data.prompt))
    return init, out, latest_checkpoint(out)


def _poison(ckpt: Path, name: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the checkpoint whose train_state/<name> is a code-running pickle; returns (copy, marker)."""
    import shutil

    bad = tmp_path / "bad" / ckpt.name
    shutil.copytree(ckpt, bad)
    marker = tmp_path / "pwned"
    with open(bad / "train_state" / name, "wb") as f:
        pickle.dump({"position": _RunsCode(marker)}, f)
    return bad, marker


@pytest.mark.parametrize("name", ["state.pt", "rng.pt"])
def test_a_code_running_state_is_refused_and_nothing_runs(checkpoint, tmp_path, name):
    init, _, ckpt = checkpoint
    bad, marker = _poison(ckpt, name, tmp_path)
    with pytest.raises(pickle.UnpicklingError):  # the real thing: this file is what torch.load would run
        torch.load(bad / "train_state" / name, weights_only=True)
    cfg = build_config("captioner", config_dict("captioner", init, tmp_path / "out", train={"resume": str(bad)}))
    with pytest.raises(InputError, match=rf"train.resume: .*{name}.* not training state") as e:
        train(cfg, loader_fn=synthetic_loader(8, prompt=cfg.data.prompt))
    assert "--" not in str(e.value)  # the library names the config key, not a flag
    assert not marker.exists()


def test_the_cli_exits_2_and_runs_nothing(checkpoint, tmp_path):
    init, _, ckpt = checkpoint
    bad, marker = _poison(ckpt, "state.pt", tmp_path)
    args = ["finetune-captioner", "--init", str(init), "--data", str(tmp_path / "none.tar"), "--out"]
    args += [str(tmp_path / "out"), "--resume", str(bad), "train.device=cpu", "model.image_size=32"]
    r = subprocess.run([sys.executable, "-m", "blipctl", *args], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "not training state" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_a_genuine_state_still_resumes(checkpoint, tmp_path):
    import shutil

    init, out, _ = checkpoint
    out = shutil.copytree(out, tmp_path / "run")
    cfg = build_config("captioner", config_dict("captioner", init, out, train={"max_steps": 2, "resume": "auto"}))
    result = train(cfg, loader_fn=synthetic_loader(8, prompt=cfg.data.prompt))
    assert result["step"] == 2


# ---- crash recovery (issue 18 items 8, 9) -----------------------------------------------------------------------
def test_a_torn_metrics_line_does_not_block_resume(checkpoint, tmp_path):
    """A run killed while appending to metrics.jsonl leaves half a line; --resume auto drops it and continues."""
    import json
    import shutil

    init, out, _ = checkpoint
    out = shutil.copytree(out, tmp_path / "run")
    metrics = out / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + whole.splitlines()[-1][:17])  # a torn copy of the last record, no newline
    cfg = build_config("captioner", config_dict("captioner", init, out, train={"max_steps": 2, "resume": "auto"}))
    events = []
    result = train(cfg, on_log=events.append, loader_fn=synthetic_loader(8, prompt=cfg.data.prompt))
    assert result["step"] == 2
    steps = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]  # every line parses
    assert steps == [1, 2]
    assert any("metrics.jsonl" in e.get("message", "") for e in events if e["event"] == "warning")


# what the writers raise on a full disk (measured on a 1 MiB tmpfs): torch.save's zip writer, and the errno itself
FULL_DISK = {
    "torch": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
    "errno": OSError(errno.ENOSPC, "No space left on device"),
}


@pytest.mark.parametrize("raised", FULL_DISK)
def test_a_full_disk_during_a_checkpoint_is_told_and_cleaned_up(checkpoint, tmp_path, monkeypatch, raised):
    """A full disk at the second checkpoint's state.pt: the error names the checkpoint and the full disk, the
    staging directory is gone, the first checkpoint is intact and the run resumes from it."""
    import blip.train_checkpoint as tc

    init, _, _ = checkpoint
    out = tmp_path / "run"
    real, calls = tc._torch_save, []

    def save_on_a_full_disk(obj, path):
        calls.append(path.name)
        if calls.count("state.pt") == 2:
            path.write_bytes(b"PK\x03\x04 half")  # what the writer got out before the disk filled
            raise FULL_DISK[raised]
        real(obj, path)

    monkeypatch.setattr(tc, "_torch_save", save_on_a_full_disk)
    cfg = build_config("captioner", config_dict("captioner", init, out, train={"max_steps": 3, "save_every": 1}))
    with pytest.raises(OSError, match=r"no space left on device \(.*step_000002\)") as e:
        train(cfg, loader_fn=synthetic_loader(8, prompt=cfg.data.prompt))
    assert "unexpected pos" not in str(e.value)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000001"]  # no .staging-*
    assert latest_checkpoint(out).name == "step_000001"
    monkeypatch.setattr(tc, "_torch_save", real)
    cfg = build_config("captioner", config_dict("captioner", init, out, train={"max_steps": 3, "resume": "auto"}))
    assert train(cfg, loader_fn=synthetic_loader(8, prompt=cfg.data.prompt))["step"] == 3
