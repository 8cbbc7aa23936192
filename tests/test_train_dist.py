"""torchrun with 2 CPU processes (gloo) against 1 process with the same global batch.

What is comparable: both runs read exactly the same global batches (the worker in helpers.py
slices each global batch by rank), the micro model has no dropout and the data no augmentation. With
`negatives_all_ranks` every rank draws the hard negatives of the whole global batch from one shared
per-step generator, ITC gathers the momentum features of all ranks, and the queue receives them in rank
order, so the 2-process run computes the same losses as the 1-process one; only float summation order
differs (DDP's gradient all-reduce vs one batched backward). Tolerance: 1e-4 absolute on every logged loss
(rounded to 1e-6) over 6 steps, an epoch boundary included. Weights are not compared: Adam turns float noise
in near-zero gradients into updates of up to lr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import micro_init, read_metrics

from blip.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "helpers.py")
BIN = Path(sys.executable).parent
LOSSES = ("itc_loss", "itm_loss", "lm_loss", "loss")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return env | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("padding, swaps", [("max_length", ""), ("longest", ""), ("longest", "1")])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, padding, swaps):
    # "longest": captions of different lengths, so each rank pads its batch to a different length and the ITM
    # negatives, drawn from the whole global batch, need one length (this crashed in gloo's all_gather); swaps:
    # word-swap negatives, tokenised per rank, are padded to that length and drawn per sample, not per rank
    init = micro_init(tmp_path / "init")
    one, two = tmp_path / "one", tmp_path / "two"
    steps = "6"
    r1 = subprocess.run(
        [sys.executable, WORKER, str(init), str(one), "16", steps, "1", padding, swaps],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", WORKER, str(init), str(two), "8", steps, "1"]
        + [padding, swaps],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    diffs = {k: max(abs(ra[k] - rb[k]) for ra, rb in zip(a, b, strict=True)) for k in LOSSES}
    assert all(d < 1e-4 for d in diffs.values()), diffs
    assert load_model(two).model.config.text_decoder  # rank 0 wrote a loadable final model


FRESH_TOKENIZER_WORKER = """
import json, sys
sys.path.insert(0, sys.argv[3])
from helpers import synthetic_loader
from blip.distributed import barrier, cleanup, init_distributed
from blip.train import Trainer
from blip.train_config import build_config

info = init_distributed("cpu")
cfg = build_config("pretrain", {"model": {"size": "tiny", "tokenizer_vocab": 60}, "train": {"out": sys.argv[1]}})
tok = Trainer(cfg, info, None, synthetic_loader(8)).fresh_tokenizer()
ids = {"vocab": tok.hf.get_vocab(), "specials": [tok.pad_id, tok.cls_id, tok.sep_id, tok.bos_id, tok.enc_id]}
ids["encoded"] = tok.hf("a red circle on the left, zebra")["input_ids"]
with open(f"{sys.argv[2]}/rank{info.rank}.json", "w") as f:
    json.dump(ids, f)
barrier(info)
cleanup(info)
"""


def test_a_fresh_tokenizer_is_the_same_on_every_rank(tmp_path):
    """Rank 0 trains the vocabulary on the captions and broadcasts it; the other ranks build theirs from that list
    (Tokenizer.from_vocab) and must map every token, special and caption to the same ids."""
    script = tmp_path / "worker.py"
    script.write_text(FRESH_TOKENIZER_WORKER)
    r = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path / "o"),
            str(tmp_path),
            str(ROOT / "tests"),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert len(rank0["vocab"]) > 10 and rank0["specials"][-2:] == [len(rank0["vocab"]) - 2, len(rank0["vocab"]) - 1]
    assert rank0 == rank1
