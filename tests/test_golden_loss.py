"""A golden loss curve: 6 pre-training steps of the micro model on the synthetic pairs, fixed seed, one thread.

The numbers were recorded with the code before the Trainer was split (commit 2494055), so a refactor that changes
the maths (a loss, the schedule, the data order, the init) shows here. Tolerance: 2e-4 absolute on every logged
loss (logged rounded to 1e-6); float summation order differs between machines and thread counts by far less, while
a changed loss moves these numbers by 1e-2 or more.
"""

from __future__ import annotations

import pytest
import torch
from helpers import config_dict, micro_init, read_metrics, synthetic_loader

from blip.train import train
from blip.train_config import build_config

GOLDEN = [  # step, itc_loss, itm_loss, lm_loss, loss
    (1, 2.124968, 0.890191, 5.117796, 8.132956),
    (2, 2.749387, 0.898182, 5.066614, 8.714183),
    (3, 3.119776, 0.682278, 4.698822, 8.500876),
    (4, 3.448590, 0.707776, 4.204879, 8.361245),
    (5, 3.713241, 0.763140, 3.760144, 8.236525),
    (6, 3.738831, 0.742399, 3.573685, 8.054915),
]
TOLERANCE = 2e-4


def test_tiny_pretraining_follows_the_golden_curve(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        init = micro_init(tmp_path / "init")
        d = config_dict("pretrain", init, tmp_path / "out", train={"max_steps": 6, "epochs": 100})
        train(build_config("pretrain", d), loader_fn=synthetic_loader(8))
    finally:
        torch.set_num_threads(threads)
    rows = read_metrics(tmp_path / "out")
    got = [(r["step"], r["itc_loss"], r["itm_loss"], r["lm_loss"], r["loss"]) for r in rows]
    assert [g[0] for g in got] == [g[0] for g in GOLDEN]
    for g, want in zip(got, GOLDEN, strict=True):
        assert g[1:] == pytest.approx(want[1:], abs=TOLERANCE), (g, want)
