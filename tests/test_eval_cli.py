"""eval-retrieval and eval-caption end to end through the real CLI, on a tiny saved model and a tiny dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import CAPTION_GT, CAPTION_RESULTS, direct_scores, eval_tokenizer, native_model
from PIL import Image
from typer.testing import CliRunner

from blip.checkpoint import load_model, save_checkpoint
from blip.data.datasets import load_eval_set
from blip.eval.retrieval import METRIC_KEYS, evaluate_retrieval
from blipctl.cli import app
from blipctl.commands.evaluate import eval_retrieval

COLORS = ["red", "blue", "green", "yellow"]
SHAPES = ["circle", "square", "star"]
CAPTION_KEYS = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
VENV_BIN = Path(sys.executable).parent
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def flat(output: str) -> str:
    """Rich wraps long messages at the terminal width (mid-word): undo that before searching."""
    return output.replace("\n", "")


def json_line(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout  # --json: one object line, nothing else on stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = eval_tokenizer()
    d = tmp_path_factory.mktemp("model") / "tiny"
    save_checkpoint(native_model(tok, seed=11), tok, d)
    return d


@pytest.fixture(scope="module")
def ann(tmp_path_factory):
    """6 images with 2 distinct captions each, as an annotation JSON (the original Karpathy val/test records)."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    texts = [f"a {COLORS[i % 4]} {SHAPES[i % 3]} on the {'left' if i % 2 else 'right'}" for i in range(12)]
    records = []
    for i in range(6):
        arr = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
        arr[:20, :20] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(d / f"img{i}.png")
        records.append({"image": f"img{i}.png", "caption": texts[2 * i : 2 * i + 2]})
    p = d / "test.json"
    p.write_text(json.dumps(records))
    return p


def test_eval_retrieval_cli_json_and_out_file(ckpt, ann, tmp_path):
    out = tmp_path / "sub" / "ret.json"
    r = cli("eval-retrieval", ann, "--model", ckpt, "--k", 4, "--json", "--out", out)
    assert r.exit_code == 0, r.output
    got = json_line(r.stdout)
    assert set(METRIC_KEYS) <= set(got) and got["model"] == str(ckpt)
    assert got["settings"]["k"] == 4 and got["stats"] == {**got["stats"], "num_images": 6, "num_texts": 12}
    assert all(0.0 <= got[k] <= 100.0 for k in METRIC_KEYS)
    assert json.loads(out.read_text()) == got
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    # the library on the same set gives the same numbers
    loaded = load_model(ckpt)
    want = evaluate_retrieval(load_eval_set(str(ann)), loaded.model, loaded.tokenizer, k=4)
    assert {k: got[k] for k in METRIC_KEYS} == want


def test_eval_retrieval_in_process_call(ckpt, ann, tmp_path):
    """The plain function the recipe runner calls; a suffix-less --out is a directory, as recipe steps get."""
    res = eval_retrieval(dataset=str(ann), model=str(ckpt), k=3, out=str(tmp_path / "step"))
    assert set(METRIC_KEYS) <= set(res)
    assert json.loads((tmp_path / "step" / "eval-retrieval.json").read_text()) == res


def test_eval_caption_cli(ckpt, ann, tmp_path):
    out, caps = tmp_path / "cap.json", tmp_path / "captions.json"
    r = cli(
        "eval-caption", ann, "--model", ckpt, "--no-meteor", "--num-beams", 2, "--json", "--out", out,
        "--results-out", caps,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json_line(r.stdout)
    assert CAPTION_KEYS <= set(got) and "METEOR" not in got
    assert got["model"] == str(ckpt) and got["settings"]["num_beams"] == 2
    assert any("SPICE" in n for n in got["notes"])
    assert json.loads(out.read_text()) == got
    results = json.loads(caps.read_text())
    assert [x["image_id"] for x in results] == list(range(6))  # ids from the file names img0..img5
    assert all(isinstance(x["caption"], str) and not x["caption"].startswith("a picture of") for x in results)
    # scoring the written results file gives the same metrics
    r2 = cli("eval-caption", "--results", caps, "--annotations", _gt_file(ann, tmp_path), "--no-meteor", "--json")
    assert r2.exit_code == 0, r2.output
    assert {k: json_line(r2.stdout)[k] for k in CAPTION_KEYS} == {k: got[k] for k in CAPTION_KEYS}


def _gt_file(ann: Path, tmp_path: Path) -> Path:
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(load_eval_set(str(ann)).gt))
    return p


def _write(tmp_path: Path, results=CAPTION_RESULTS, gt=CAPTION_GT) -> tuple[Path, Path]:
    res, gtp = tmp_path / "results.json", tmp_path / "gt.json"
    res.write_text(json.dumps(results))
    gtp.write_text(json.dumps(gt))
    return res, gtp


def test_results_mode_equals_pycocoevalcap(tmp_path):
    res, gt = _write(tmp_path)
    r = cli("eval-caption", "--results", res, "--annotations", gt, "--no-meteor", "--json")
    assert r.exit_code == 0, r.output
    got = json_line(r.stdout)
    want = direct_scores(CAPTION_RESULTS, CAPTION_GT, meteor=False)
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-12)
    assert got["model"] is None and got["stats"]["num_images"] == 4


@pytest.mark.slow
def test_results_mode_with_meteor_equals_pycocoevalcap(tmp_path):
    res, gt = _write(tmp_path)
    r = cli("eval-caption", "--results", res, "--annotations", gt, "--json")
    assert r.exit_code == 0, r.output
    got = json_line(r.stdout)
    want = direct_scores(CAPTION_RESULTS, CAPTION_GT, meteor=True)
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-12)


@pytest.mark.slow
def test_eval_caption_cli_with_meteor(ckpt, ann):
    r = cli("eval-caption", ann, "--model", ckpt, "--json")
    assert r.exit_code == 0, r.output
    assert CAPTION_KEYS | {"METEOR"} <= set(json_line(r.stdout))


# ---- bad input: exit 2, a message naming the file, no traceback --------------------------------------------------
def test_missing_coco_data_names_the_expected_file(tmp_path):
    r = cli("eval-retrieval", "coco", "--data-root", tmp_path)
    assert r.exit_code == 2
    assert "annotations/coco_karpathy_test.json" in flat(r.output) and "Traceback" not in r.output
    r = cli("eval-caption", "flickr30k", "--data-root", tmp_path, "--split", "val")
    assert r.exit_code == 2 and "annotations/flickr30k_val.json" in flat(r.output)


def test_missing_files_exit_2(tmp_path, ann, ckpt):
    r = cli("eval-retrieval", tmp_path / "nope.json", "--model", ckpt)
    assert r.exit_code == 2 and "nope.json" in flat(r.output)
    r = cli("eval-caption", "--results", tmp_path / "nope.json", "--annotations", tmp_path / "gt.json")
    assert r.exit_code == 2 and "gt.json" in flat(r.output)
    res, _ = _write(tmp_path)
    r = cli("eval-caption", "--results", res)
    assert r.exit_code == 2 and "--annotations" in flat(r.output)
    r = cli("eval-caption")
    assert r.exit_code == 2 and "DATASET" in flat(r.output)
    r = cli("eval-retrieval", ann, "--model", tmp_path / "no_model")
    assert r.exit_code == 2 and "no_model" in flat(r.output)


def test_missing_data_through_the_console_script(tmp_path):
    r = subprocess.run(
        [str(VENV_BIN / "blipctl"), "eval-retrieval", "flickr30k", "--data-root", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "annotations/flickr30k_test.json" in flat(r.stderr) and "Traceback" not in r.stderr and r.stdout == ""


# ---- torchrun ----------------------------------------------------------------------------------------------------
SCORES_SCRIPT = """
import sys
import numpy as np
from blip.checkpoint import load_model
from blip.data.datasets import load_eval_set
from blip.data.transforms import eval_transform
from blip.distributed import barrier, cleanup, init_distributed
from blip.eval.common import PixelDataset
from blip.eval.retrieval import retrieval_scores

info = init_distributed("cpu")
loaded, es = load_model(sys.argv[1]), load_eval_set(sys.argv[2])
px = PixelDataset(es, eval_transform(loaded.model.config.vision.image_size))
kw = dict(image_batch_size=4, text_batch_size=4, pairs_per_batch=4)
i2t, t2i = retrieval_scores(loaded.model, loaded.tokenizer, px, es.texts, k=3, **kw)
itc, _ = retrieval_scores(loaded.model, loaded.tokenizer, px, es.texts, k=0, **kw)  # ITC alone
if info.rank == 0:
    np.savez(sys.argv[3], i2t=i2t, t2i=t2i, itc=itc, world=info.world_size)
barrier(info)  # as the CLI does: all ranks done, then leave the group (a rank leaving early can abort at exit)
cleanup(info)
"""


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    # one thread per process everywhere: the same kernels, so the same bits, in both runs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


TORCHRUN = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2"]


def test_torchrun_scores_are_bit_identical_to_one_process(ckpt, ann, tmp_path):
    script = tmp_path / "scores.py"
    script.write_text(SCORES_SCRIPT)
    _run([*TORCHRUN, str(script), str(ckpt), str(ann), str(tmp_path / "two.npz")])
    _run([sys.executable, str(script), str(ckpt), str(ann), str(tmp_path / "one.npz")])
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert int(two["world"]) == 2 and int(one["world"]) == 1
    np.testing.assert_array_equal(two["i2t"], one["i2t"])
    np.testing.assert_array_equal(two["t2i"], one["t2i"])
    np.testing.assert_array_equal(two["itc"], one["itc"])
    assert (one["itc"] > -1.01).all() and (one["i2t"] == -100).any()  # k=0 scores every pair, k=3 only candidates


def test_torchrun_cli_gives_the_same_metrics(ckpt, ann, tmp_path):
    # small batches so both ranks get images, texts and ITM chunks to score
    args = ["eval-retrieval", str(ann), "--model", str(ckpt), "--k", "3", "--batch-size", "4", "--json"]
    got = json_line(_run([*TORCHRUN, "-m", "blipctl", *args, "--out", str(tmp_path / "2.json")]).stdout)
    want = json_line(_run([sys.executable, "-m", "blipctl", *args]).stdout)  # only rank 0 printed
    assert got["settings"]["world_size"] == 2 and want["settings"]["world_size"] == 1
    assert {k: got[k] for k in METRIC_KEYS} == {k: want[k] for k in METRIC_KEYS}
    assert json.loads((tmp_path / "2.json").read_text()) == got
