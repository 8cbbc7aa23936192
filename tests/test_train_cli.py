"""Config input (TOML, KEY=VALUE), its errors (exit 2 naming the key), and the commands' help."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from blip.errors import InputError
from blip.train_config import build_config, task_defaults
from blipctl.cli import app
from blipctl.commands.train import build_train_config
from blipctl.overrides import parse_overrides, parse_value, resolve

runner = CliRunner()


def test_values_are_toml_literals_else_strings():
    assert parse_value("1e-4") == 1e-4 and parse_value("16") == 16 and parse_value("true") is True
    assert parse_value('["a.tar", "b.tar"]') == ["a.tar", "b.tar"]
    assert parse_value("runs/pt") == "runs/pt" and parse_value("a picture of ") == "a picture of "
    assert parse_value('"quoted"') == "quoted" and parse_value("{lr = 1}") == {"lr": 1}
    assert parse_value("none") is None and parse_value("null") is None and parse_value('"none"') == "none"
    assert parse_overrides(["optim.lr=1e-4", "data.batch_size=16", "model.init=/x=y"]) == {
        "optim": {"lr": 1e-4},
        "data": {"batch_size": 16},
        "model": {"init": "/x=y"},
    }


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=1"])
def test_malformed_overrides_name_themselves(bad):
    with pytest.raises(InputError, match="override"):
        parse_overrides([bad])


def test_precedence_file_then_flags_then_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[optim]\nlr = 1e-3\nmin_lr = 0.0\n[data]\nbatch_size = 4\n[train]\nout = "from_file"\n')
    d = resolve(f, {"train": {"out": "from_flag"}}, ["optim.lr=2e-3"])
    assert d == {"optim": {"lr": 2e-3, "min_lr": 0.0}, "data": {"batch_size": 4}, "train": {"out": "from_flag"}}
    cfg = build_train_config("pretrain", config=str(f), out="flag_out", overrides=["optim.lr=2e-3"], max_steps=7)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.data.batch_size, cfg.train.out) == (2e-3, 0.0, 4, "flag_out")
    assert cfg.train.max_steps == 7 and cfg.optim.warmup_steps == 3000  # untouched keys keep the task default


def test_task_defaults_are_the_originals():
    pre, cap, fil = (build_config(t, {}) for t in ("pretrain", "captioner", "filter"))
    assert (pre.optim.lr, pre.optim.min_lr, pre.optim.warmup_steps, pre.optim.decay_rate) == (3e-4, 1e-6, 3000, 0.9)
    assert (pre.data.batch_size, pre.model.image_size, pre.data.text_length, pre.data.min_scale) == (75, 224, 30, 0.2)
    assert (pre.loss.queue_size, pre.loss.alpha, pre.loss.momentum, pre.train.epochs) == (57600, 0.4, 0.995, 20)
    assert (cap.optim.lr, cap.train.epochs, cap.data.batch_size, cap.model.image_size) == (1e-5, 5, 32, 384)
    assert (cap.data.text_length, cap.data.prompt, cap.optim.schedule, cap.optim.warmup_steps) == (
        40,
        "a picture of ",
        "cosine",
        0,
    )
    assert (fil.optim.lr, fil.train.epochs, fil.data.batch_size, fil.model.image_size) == (1e-5, 6, 32, 384)
    assert (fil.loss.queue_size, fil.loss.negatives_all_ranks, fil.model.grad_ckpt_layers) == (57600, True, 4)
    assert (fil.data.text_length, fil.loss.alpha_ramp_epochs, fil.loss.lm) == (35, 1.0, 0.0)
    assert task_defaults("filter")["optim"]["min_lr"] == 0.0


@pytest.mark.parametrize(
    "d, key",
    [
        ({"optim": {"lrr": 1.0}}, "optim.lrr"),
        ({"bogus": 1}, "bogus"),
        ({"data": {"batch_size": "big"}}, "data.batch_size"),
        ({"train": {"precision": "fp8"}}, "train.precision"),
        ({"loss": {"negatives_all_ranks": 1}}, "loss.negatives_all_ranks"),
        ({"data": {"batch_size": 0}}, "data.batch_size"),
        ({"loss": {"alpha": 2.0}}, "loss.alpha"),
        ({"data": {"shuffle_buffer": 0}}, "data.shuffle_buffer"),
        ({"optim": 3}, "optim"),
    ],
)
def test_bad_config_names_the_key(d, key):
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        build_config("pretrain", d)


def test_cli_bad_override_exits_2_naming_the_key(tmp_path):
    r = runner.invoke(app, ["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "optim.lrr=1"])
    assert r.exit_code == 2 and "optim.lrr" in r.output
    r = runner.invoke(app, ["finetune-filter", "--init", "x", "--data", "coco", "--out", "o", "data.batch_size=big"])
    assert r.exit_code == 2 and "data.batch_size" in r.output
    r = runner.invoke(app, ["finetune-captioner", "--init", "x", "--data", "coco", "--out", "o", "nokeyvalue"])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output


def test_cli_bad_config_file_exits_2(tmp_path):
    bad_key = tmp_path / "k.toml"
    bad_key.write_text("[optim]\nlearning_rate = 1e-4\n")
    r = runner.invoke(app, ["pretrain", "--config", str(bad_key), "--data", "d", "--out", "o"])
    assert r.exit_code == 2 and "optim.learning_rate" in r.output
    bad_toml = tmp_path / "t.toml"
    bad_toml.write_text("[optim\nlr = 1\n")
    r = runner.invoke(app, ["pretrain", "--config", str(bad_toml), "--data", "d", "--out", "o"])
    assert r.exit_code == 2 and "t.toml" in r.output
    r = runner.invoke(app, ["pretrain", "--config", str(tmp_path / "none.toml"), "--data", "d", "--out", "o"])
    assert r.exit_code == 2 and "none.toml" in r.output


def test_real_cli_error_has_no_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "blipctl", "pretrain", "--data", str(tmp_path), "--out", "o", "train.epochs=-1"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "train.epochs" in r.stderr and "Traceback" not in r.stderr


def test_help_teaches_examples_and_defaults():
    for cmd, needles in {
        "pretrain": ("torchrun", "--resume auto", "lr=0.0003", "queue_size=57600", "batch_size=75"),
        "finetune-captioner": ("prompt='a picture of '", "lr=1e-05", "image_size=384", "text_length=40"),
        "finetune-filter": ("negatives_all_ranks=true", "grad_ckpt_layers=4", "epochs=6"),
    }.items():
        r = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0
        for n in needles:
            assert n in r.output, (cmd, n)
