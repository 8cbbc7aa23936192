"""Output safety (DESIGN §10): file modes follow the umask, nothing blipctl did not write is deleted, a full disk
during a checkpoint is reported and cleaned up."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from helpers import config_dict, make_images, micro_config, micro_init, micro_tokenizer, synthetic_loader
from typer.testing import CliRunner

from blip.atomic import write_json
from blip.checkpoint import export_hf, save_checkpoint
from blip.model.blip import BLIP
from blip.outputs import output_kind
from blip.train import train
from blip.train_config import build_config
from blipctl.cli import app


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False, env={"HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    tok = micro_tokenizer()
    return BLIP(micro_config(tok)), tok


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_take_the_umask(tmp_path: Path, micro, umask: int):
    """Files 0666 & ~umask and directories 0777 & ~umask, like cp or tar (mkstemp/mkdtemp would give 0600/0700)."""
    model, tok = micro
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        ck = save_checkpoint(model, tok, tmp_path / "ck")
        hf, _ = export_hf(model, tok, tmp_path / "hf")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o666 & ~umask
    for d in (ck, hf):
        assert _mode(d) == 0o777 & ~umask, d
        for f in d.iterdir():
            assert _mode(f) == 0o666 & ~umask, f


# ---- never delete what blipctl did not write (issue 18 item 6) ----------------------------------------------------
def _user_dir(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("mine")
    (d / "config.json").write_text('{"mine": true}')
    return d


@pytest.mark.parametrize("fmt", ["hf", "blipctl"])
def test_export_refuses_a_directory_it_did_not_write(fmt, tmp_path, micro):
    model, tok = micro
    src = save_checkpoint(model, tok, tmp_path / "src")
    out = _user_dir(tmp_path / "out")
    r = cli("export", "--model", src, "--format", fmt, "--out", out)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    text = r.output.replace("\n", "")
    assert str(out) in text and "notes.txt" in text and "--overwrite" in text
    assert json.loads((out / "config.json").read_text()) == {"mine": True}
    # an earlier export of the same format is replaced in place; other files stay
    again = tmp_path / "again"
    for _ in range(2):
        assert cli("export", "--model", src, "--format", fmt, "--out", again).exit_code == 0
        (again / "notes.txt").write_text("mine")
    assert (again / "notes.txt").read_text() == "mine"
    # --overwrite writes blipctl's files into it and deletes nothing else
    assert cli("export", "--model", src, "--format", fmt, "--out", out, "--overwrite").exit_code == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    assert (
        cli("caption", make_images(tmp_path / "im", 1)[0], "--model", out if fmt == "blipctl" else src).exit_code == 0
    )


def test_training_refuses_a_directory_that_is_not_a_run(tmp_path):
    init = micro_init(tmp_path / "micro")
    out = _user_dir(tmp_path / "run")
    (out / "metrics.jsonl").write_text("my own metrics\n")
    base = ["finetune-captioner", "--init", init, "--data", tmp_path / "none.tar", "--out", out]
    base += ["train.device=cpu", "model.image_size=32"]
    r = cli(*base)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    text = r.output.replace("\n", "")
    assert str(out) in text and "notes.txt" in text and "--overwrite" in text and "train.out" not in text
    assert (out / "metrics.jsonl").read_text() == "my own metrics\n"
    assert json.loads((out / "config.json").read_text()) == {"mine": True}
    cfg = build_config("captioner", config_dict("captioner", init, out, train={"max_steps": 1, "overwrite": True}))
    train(cfg, loader_fn=synthetic_loader(8, prompt=cfg.data.prompt))
    assert (out / "notes.txt").read_text() == "mine" and output_kind(out) == "run"
