"""`blipctl run`: every recipe in recipes/ validates; the runner skips finished steps, reruns from a step, stops
at a failed step with earlier outputs intact, and names unknown keys and bad references (exit 2)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip.data.demo import SCALES
from blip.errors import InputError
from blipctl.cli import app
from blipctl.recipe import MARKER, load_recipe, run_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))
runner = CliRunner()


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"demo.toml", "blip-base-14m.toml", "coco-finetune.toml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path, tmp_path):
    r = load_recipe(path, [f"recipe.out={tmp_path}"])
    assert r.steps
    for st in r.steps:
        out = st.params.get("out") or st.params.get("out_dir")
        assert out and "${" not in json.dumps(st.params), st.name  # every reference resolved
    r = runner.invoke(app, ["run", str(path), "--dry-run", f"recipe.out={tmp_path}"])
    assert r.exit_code == 0, r.output


def test_demo_recipe_is_the_bootstrap():
    r = load_recipe(ROOT / "recipes" / "demo.toml")
    by = {s.name: s for s in r.steps}
    cmds = [s.command for s in r.steps]
    assert cmds[:8] == [
        "data demo",
        "pretrain-vision",
        "pretrain",
        "pretrain",
        "finetune-captioner",
        "finetune-filter",
        "capfilt",
        "pretrain",
    ]
    a, b, w, v = by["pretrain_a"], by["pretrain_b"], by["warmstart"], by["vision"]
    # A and B start from the same warm start (BLIP's shared ImageNet-ViT + BERT init), trained on human data only
    assert a.params["init"] == b.params["init"] == w.params["out"]
    data_out = by["data"].params["out"]
    assert w.params["data"]["train"] == [data_out + "/human"]
    # ... whose tower starts classified on the world's single objects (the ImageNet start), with the same shape
    assert w.params["model"]["vision_init"] == v.params["out"] and v.params["train"] == data_out + "/objects"
    assert w.params["model"]["stem"] == v.params["stem"] and w.params["model"]["image_size"] == v.params["image_size"]
    assert w.params["model_size"] == v.params["size"] and set(v.params["heads"]) == {
        "shape",
        "color",
        "size",
        "position",
    }
    # A sees every web image (with half of them, even a perfect filter gained little: README)
    assert a.params["data"]["train"] == [data_out + "/human", data_out + "/web"]
    assert by["capfilt"].params["inputs"] == a.params["data"]["train"][1]  # A's raw web is what CapFilt cleans
    assert by["capfilt"].params["captioner"] == by["captioner"].params["out"]
    assert by["capfilt"].params["filter"] == by["filter"].params["out"]
    # B learns from the paper's full CapFilt: web and synthetic captions (nucleus sampling), both filtered
    assert by["capfilt"].params["num_captions"] == 1 and 0 < by["capfilt"].params["top_p"] < 1
    assert by["capfilt"].params["threshold"] > 0
    assert b.params["data"]["train"][1] == by["capfilt"].params["out_dir"]
    # CapFilt's captioner and filter are fine-tuned from A
    assert by["captioner"].params["init"] == by["filter"].params["init"] == a.params["out"]
    assert by["captioner"].command == "finetune-captioner"
    # the same compute budget for both pre-trainings
    assert a.params["max_steps"] == b.params["max_steps"] and a.params["batch_size"] == b.params["batch_size"]
    assert {k: v for k, v in a.params["data"].items() if k != "train"} == {
        k: v for k, v in b.params["data"].items() if k != "train"
    }
    # captioning is scored after the same captioner fine-tune of each pre-training (the paper's Table 1 protocol),
    # separate from CapFilt's captioner, which is trained to write right captions rather than to measure A
    cap_a, cap_b = by["captioner_a"], by["captioner_b"]
    assert cap_a.command == cap_b.command == "finetune-captioner"
    assert cap_a.params["init"] == a.params["out"] and cap_b.params["init"] == b.params["out"]
    assert {k: v for k, v in cap_a.params.items() if k not in ("init", "out", "name")} == {
        k: v for k, v in cap_b.params.items() if k not in ("init", "out", "name")
    }
    assert by["caption_a"].params["model"] == cap_a.params["out"]
    assert by["caption_b"].params["model"] == cap_b.params["out"]
    assert by["retrieval_a"].params["model"] == a.params["out"] and by["retrieval_b"].params["model"] == b.params["out"]
    # A and B are ranked the same way: ITC alone (their short pre-trainings leave the ITM heads near chance)
    assert by["retrieval_a"].params["k"] == by["retrieval_b"].params["k"] == 0
    assert by["compare"].params["capfilt"].endswith("capfilt.json")
    # the warm start pre-trains the unimodal towers only (ITC), as BLIP starts from ImageNet-ViT + BERT
    assert (w.params["loss"]["itm"], w.params["loss"]["lm"]) == (0.0, 0.0) and "itc" not in w.params["loss"]
    # every training step shuffles all of its pairs at full scale (read shard by shard, A's human/web mix hung on the
    # seed): human images have up to 3 captions, CapFilt keeps up to 1 + num_captions per web image
    human, web = SCALES["full"]["human"][0], SCALES["full"]["web"][0]
    most_pairs = 3 * human + (1 + by["capfilt"].params["num_captions"]) * web
    for st in (w, a, b, by["captioner"], by["filter"], cap_a, cap_b):
        assert st.params["data"]["shuffle_buffer"] >= most_pairs, st.name


def test_demo_scores_whole_captions():
    """Every caption the world's grammar writes fits, after the captioner's prompt, in the demo's caption max_length:
    the paper's 20 tokens (COCO captions are ~10 words) cut up to half of the generated captions mid-phrase."""
    import random

    from blip.data.demo import describe, random_scene
    from blip.tokenizer import Tokenizer
    from blip.train_config import task_defaults

    rng = random.Random(0)
    captions = [describe(random_scene(rng), rng) for _ in range(20000)]
    tok = Tokenizer.train(captions)
    by = {s.name: s for s in load_recipe(ROOT / "recipes" / "demo.toml").steps}
    prompt = task_defaults("captioner")["data"]["prompt"]
    for name in ("captioner", "captioner_a", "captioner_b"):
        assert by[name].params["data"].get("prompt", prompt) == prompt
    _, mask = tok([prompt + c for c in captions], max_length=512)  # [CLS] (the decoder's [DEC]) prompt caption [SEP]
    longest = int(mask.sum(1).max())
    assert longest > 20  # the grammar does write captions that the paper's length cuts
    for name in ("caption_a", "caption_b"):
        assert by[name].params["max_length"] >= longest, name
        assert "prompt" not in by[name].params  # the fine-tune's prompt (eval-caption's default) is the one scored


# ---- the runner on real, fast steps ---------------------------------------------------------------------------------
def _write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(f'[recipe]\nname = "t"\nout = "{tmp_path / "out"}"\n' + body)
    return p


DATA = '[[step]]\nname = "data"\ncommand = "data demo"\nscale = "small"\nnoise = 0.25\n'
DATA2 = '[[step]]\nname = "data2"\ncommand = "data demo"\nscale = "small"\nseed = 1\n'


def test_rerun_skips_finished_steps_and_from_reruns(tmp_path):
    p = _write(tmp_path, DATA + DATA2)
    res = run_recipe(load_recipe(p))
    assert res["data"]["noise"]["noisy"] == 300  # the data step ran and returned its summary (25% of 1200)
    data_dir = tmp_path / "out" / "data"
    assert (data_dir / MARKER).is_file() and (data_dir / "world.json").is_file()
    stamp = (data_dir / "world.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert run_recipe(load_recipe(p)) == {"data": "skipped", "data2": "skipped"}
    assert time.perf_counter() - t0 < 30
    assert (data_dir / "world.json").stat().st_mtime_ns == stamp
    res = run_recipe(load_recipe(p), from_step="data2")
    assert res["data"] == "skipped" and res["data2"] != "skipped"
    res = run_recipe(load_recipe(p), only="data")
    assert list(res) == ["data"] and res["data"] != "skipped"
    # changing a step's option reruns it
    res = run_recipe(load_recipe(p, ["data.noise=0.5"]))
    assert res["data"] != "skipped"


def test_only_rank_zero_marks_a_step_done(tmp_path, monkeypatch):
    p = _write(tmp_path, DATA)
    monkeypatch.setenv("RANK", "1")
    run_recipe(load_recipe(p))
    assert (tmp_path / "out" / "data" / "world.json").is_file() and not (tmp_path / "out" / "data" / MARKER).exists()
    monkeypatch.setenv("RANK", "0")
    assert run_recipe(load_recipe(p))["data"] != "skipped"
    assert (tmp_path / "out" / "data" / MARKER).is_file()


def test_failed_step_stops_the_run_and_keeps_earlier_outputs(tmp_path):
    bad = '[[step]]\nname = "ret"\ncommand = "eval-retrieval"\ndataset = "${data.out}/test/test.json"\n'
    bad += f'model = "{tmp_path / "no-such-model"}"\n'
    after = '[[step]]\nname = "late"\ncommand = "data demo"\nscale = "small"\nseed = 3\n'
    p = _write(tmp_path, DATA + bad + after)
    r = runner.invoke(app, ["run", str(p)])
    assert r.exit_code == 2, r.output
    assert "no-such-model" in r.output and "Traceback" not in r.output
    assert (tmp_path / "out" / "data" / MARKER).is_file()
    assert not (tmp_path / "out" / "late").exists()
    r = runner.invoke(app, ["run", str(p), "--dry-run"])
    flat = " ".join(r.output.split())
    assert "done data (" in flat and "to run ret (" in flat and "to run late (" in flat, flat


@pytest.mark.parametrize(
    ("body", "overrides", "needle"),
    [
        (DATA + 'colour = "red"\n', [], "unknown key 'colour'"),
        (DATA + '[[step]]\nname = "x"\ncommand = "capfilt"\ninputs = "${dta.out}/web"\n', [], "${dta.out}"),
        (DATA + '[[step]]\nname = "x"\ncommand = "capfilt"\ninputs = "${data.nope}"\n', [], "no key 'nope'"),
        (DATA + '[[step]]\nname = "x"\ncommand = "blip-it"\n', [], "unknown command 'blip-it'"),
        (DATA, ["data.scale=3"], "data.scale"),
        (DATA, ["nostep.scale=full"], "no step named 'nostep'"),
        (
            DATA + '[[step]]\nname = "pt"\ncommand = "pretrain"\ndata = ["${data.out}/web"]\noptim = { lrr = 1 }\n',
            [],
            "optim.lrr",
        ),
        (
            DATA + '[[step]]\nname = "pt"\ncommand = "pretrain"\ndata = ["${data.out}/web"]\n',
            ["pt.train.max_steps='ten'"],
            "train.max_steps",
        ),
        ('[recipe2]\nname = "x"\n', [], "recipe2"),
        ("[defaults.pretrian]\nbatch_size = 4\n" + DATA, [], "defaults.pretrian"),
    ],
)
def test_bad_recipes_exit_2_naming_the_key(tmp_path, body, overrides, needle):
    p = _write(tmp_path, body)
    with pytest.raises(InputError, match=None) as e:
        load_recipe(p, overrides)
    assert needle in str(e.value)
    r = runner.invoke(app, ["run", str(p), *overrides])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert needle.split("'")[0].strip() in " ".join(r.output.split())


def test_defaults_fill_steps_and_the_steps_own_keys_win(tmp_path):
    body = (
        "[defaults.training]\nbatch_size = 4\ndata = { num_workers = 1, hflip = false }\n"
        '[defaults.pretrain]\nmodel_size = "tiny"\nbatch_size = 6\n' + DATA + "[[step]]\n"
        'name = "pt"\ncommand = "pretrain"\ndata = { train = ["${data.out}/web"], hflip = true }\n'
        '[[step]]\nname = "cap"\ncommand = "finetune-captioner"\ninit = "${pt.out}"\nbatch_size = 2\n'
        'data = { train = ["${data.out}/human"] }\n'
    )
    by = {s.name: s for s in load_recipe(_write(tmp_path, body)).steps}
    pt, cap = by["pt"], by["cap"]
    assert (pt.params["batch_size"], pt.params["model_size"], cap.params["batch_size"]) == (6, "tiny", 2)
    assert pt.params["data"] == {"train": [by["data"].out + "/web"], "num_workers": 1, "hflip": True}
    assert cap.params["data"] == {"train": [by["data"].out + "/human"], "num_workers": 1, "hflip": False}
    assert "batch_size" not in by["data"].params  # not a training step


def test_missing_recipe_file(tmp_path):
    r = runner.invoke(app, ["run", str(tmp_path / "nope.toml")])
    assert r.exit_code == 2 and "nope.toml" in r.output


CI_DEMO = [
    "data.scale=small",
    "vision.steps=4",
    "warmstart.max_steps=4",
    "pretrain_a.max_steps=8",
    "pretrain_b.max_steps=8",
    "captioner.max_steps=4",
    "filter.max_steps=4",
    "captioner_a.max_steps=4",
    "captioner_b.max_steps=4",
]
CI_ABLATION = [
    "pretrain_cap.max_steps=8",
    "pretrain_filt.max_steps=8",
    "captioner_cap.max_steps=4",
    "captioner_filt.max_steps=4",
]


@pytest.mark.slow
def test_demo_and_ablation_recipes_end_to_end_at_reduced_scale(tmp_path):
    """The real `blipctl run recipes/demo.toml` (CI scale): every step runs, the table is written, a rerun of the
    finished recipe does nothing; then `recipes/ablation.toml` on the same directory adds the Filt and Cap
    columns."""
    import os
    import subprocess
    import sys

    blipctl = Path(sys.executable).parent / "blipctl"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "BLIPCTL_PROGRESS": "0"}
    args = [str(blipctl), "run", str(ROOT / "recipes" / "demo.toml"), f"recipe.out={tmp_path}", *CI_DEMO]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.loads((tmp_path / "compare.json").read_text())
    for label in ("A", "B"):
        for key in ("TR@1", "IR@1", "R@mean", "BLEU-4", "CIDEr"):
            assert isinstance(table["metrics"][key][label], float), (key, label, table)
    f = table["filter"]
    assert 0.0 <= f["precision"] <= 1.0 and 0.0 <= f["recall"] <= 1.0
    summary = json.loads((tmp_path / "capfilt" / "capfilt.json").read_text())
    assert summary["images_in"] == 1200  # all 8 small web shards
    for src, c in summary["counts"].items():
        assert c["in"] == c["kept"] + c["dropped"], src
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    steps = len(load_recipe(ROOT / "recipes" / "demo.toml").steps)
    assert r.returncode == 0 and r.stderr.count("done, skipped") == steps, r.stderr
    assert time.perf_counter() - t0 < 30
    # the ablation includes the demo: its steps are done and skipped, only the Filt and Cap columns run
    args[2] = str(ROOT / "recipes" / "ablation.toml")
    r = subprocess.run([*args, *CI_ABLATION], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0 and r.stderr.count("done, skipped") == steps, r.stderr[-3000:]
    table = json.loads((tmp_path / "ablation.json").read_text())
    for label in ("raw web", "Filt", "Cap", "CapFilt"):
        for key in ("TR@1", "IR@1", "R@mean", "BLEU-4", "CIDEr"):
            assert isinstance(table["metrics"][key][label], float), (key, label, table)
    demo = json.loads((tmp_path / "compare.json").read_text())["metrics"]
    for key in ("TR@1", "CIDEr"):  # the demo's A and B are the ablation's raw web and CapFilt columns
        assert (table["metrics"][key]["raw web"], table["metrics"][key]["CapFilt"]) == (demo[key]["A"], demo[key]["B"])
    cap = json.loads((tmp_path / "capfilt_cap" / "capfilt.json").read_text())["counts"]
    filt = json.loads((tmp_path / "capfilt_filt" / "capfilt.json").read_text())["counts"]
    full = summary["counts"]
    assert cap["synthetic"]["in"] == cap["synthetic"]["kept"] == 1200 and cap["web"]["dropped"] == 0  # unfiltered
    assert full["synthetic"]["in"] == 1200 and filt["web"] == full["web"]  # the same filter on the web captions
    assert filt.get("synthetic", {}).get("in", 0) == 0
    assert table["filter"] == summary["filter_vs_noise_labels"]  # the table reports the full CapFilt's filter


PT = (
    '[[step]]\nname = "pt"\ncommand = "pretrain"\nmodel_size = "tiny"\nbatch_size = 8\nmax_steps = 2\n'
    'data = { train = ["${data.out}/web"], num_workers = 0, num_samples = 64 }\nmodel = { image_size = 32 }\n'
    'train = { log_every = 1, device = "cpu" }\nloss = { queue_size = 16 }\n'
)


def test_changed_training_step_reruns_clean_and_a_killed_one_resumes(tmp_path):
    p = _write(tmp_path, DATA + PT)
    run_recipe(load_recipe(p))
    pt = tmp_path / "out" / "pt"
    steps = [json.loads(ln)["step"] for ln in (pt / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (pt / MARKER).is_file()
    # changed: the finished output is replaced (training would refuse a used --out)
    res = run_recipe(load_recipe(p, ["pt.max_steps=3"]))
    assert res["data"] == "skipped" and res["pt"]["step"] == 3
    steps = [json.loads(ln)["step"] for ln in (pt / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # killed before it finished (no marker): the rerun continues from the last checkpoint
    (pt / MARKER).unlink()
    res = run_recipe(load_recipe(p, ["pt.max_steps=5"]))
    assert res["pt"]["step"] == 5
    steps = [json.loads(ln)["step"] for ln in (pt / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # steps 1-3 kept: resumed, not restarted


def test_compare_tabulates_models_the_filter_and_the_synthetic_captions(tmp_path, capsys):
    from blipctl.commands.compare import run_compare

    def put(name: str, obj: dict) -> str:
        (tmp_path / name).write_text(json.dumps(obj))
        return str(tmp_path / name)

    ret = {
        lab: put(f"r{lab}.json", {"metrics": {"txt_r1": r, "img_r1": r / 2, "r_mean": r * 2}})
        for lab, r in [("A", 10.0), ("B", 12.5)]
    }
    cap = {"A": put("cA.json", {"metrics": {"Bleu_4": 0.2, "CIDEr": 0.75}})}
    noise = {
        "tp": 8,
        "fp": 1,
        "fn": 2,
        "tn": 9,
        "precision": 0.8889,
        "recall": 0.8,
        "noisy_removed": 0.8,
        "clean_kept": 0.9,
    }
    synthetic = {"all": {"checked": 40, "right": 8, "share": 0.2}, "kept": {"checked": 10, "right": 1, "share": 0.1}}
    capfilt = put("capfilt.json", {"filter_vs_noise_labels": noise, "captions_vs_scene": {"synthetic": synthetic}})
    res = run_compare(str(tmp_path / "compare.json"), ret, cap, capfilt)
    assert res["metrics"]["TR@1"] == {"A": 10.0, "B": 12.5} and res["metrics"]["IR@1"]["B"] == 6.25
    assert res["metrics"]["CIDEr"] == {"A": 0.75, "B": None}  # B has no caption results: "-" in the table
    assert res["filter"] == noise and res["synthetic_vs_scene"] == synthetic
    assert json.loads((tmp_path / "compare.json").read_text()) == res
    printed = " ".join(capsys.readouterr().out.split())
    assert "noisy web captions removed 80.0%" in printed and "20.0% of all, 10.0% of the 10 kept" in printed
    # no noise labels, and the filter kept no synthetic caption that could be checked
    capfilt = put("capfilt2.json", {"captions_vs_scene": {"synthetic": {"all": synthetic["all"]}}})
    res = run_compare(str(tmp_path / "compare2.json"), ret, cap, capfilt)
    assert "filter" not in res and res["synthetic_vs_scene"] == {"all": synthetic["all"]}
    printed = " ".join(capsys.readouterr().out.split())
    assert "synthetic captions naming the scene right: 20.0% of all, 0.0% of the 0 kept" in printed
    assert "; synthetic" not in printed


def test_a_rerun_removes_only_what_the_step_wrote(tmp_path):
    """Files the user put in a step's `out`, before its first run or after it finished, survive a changed rerun
    (issue 18 item 6: the rerun used to delete the whole directory)."""
    p = _write(tmp_path, DATA)
    data_dir = tmp_path / "out" / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "before.txt").write_text("mine")
    run_recipe(load_recipe(p))
    (data_dir / "after.txt").write_text("mine too")
    written = json.loads((data_dir / MARKER).read_text())["files"]
    assert "world.json" in written and "before.txt" not in written
    assert run_recipe(load_recipe(p, ["data.noise=0.5"]))["data"] != "skipped"
    assert (data_dir / "before.txt").read_text() == "mine" and (data_dir / "after.txt").read_text() == "mine too"
    assert (data_dir / "world.json").is_file() and json.loads((data_dir / MARKER).read_text())["signature"]


def test_brackets_in_messages_and_help_survive_rich_markup(tmp_path):
    """TOML speaks in brackets ([recipe], [[step]]); rich would take them for markup and print 'expected ,  and []'."""
    p = _write(tmp_path, '[[stepx]]\nname = "a"\n')
    r = runner.invoke(app, ["run", str(p)])
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "expected [recipe], [defaults] and [[step]]" in flat, flat
    r = runner.invoke(app, ["run", "--help"])
    assert "every [[step]] is a blipctl command" in " ".join(r.output.split()), r.output


def test_include_puts_the_included_steps_first_and_this_files_keys_win(tmp_path):
    (tmp_path / "base.toml").write_text(
        '[recipe]\nname = "base"\nout = "OUT"\n[defaults.training]\nbatch_size = 4\n' + DATA
    )
    own = '[recipe]\nname = "more"\ninclude = "base.toml"\n[defaults.training]\nbatch_size = 6\n[[step]]\n'
    own += 'name = "pt"\ncommand = "pretrain"\ndata = { train = ["${data.out}/web"] }\n'
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "more.toml"
    p.write_text(own.replace('"base.toml"', '"../base.toml"'))
    r = load_recipe(p)
    assert [s.name for s in r.steps] == ["data", "pt"] and r.meta == {"name": "more", "out": "OUT"}
    assert r.steps[1].params["batch_size"] == 6 and r.steps[1].params["data"]["train"] == ["OUT/data/web"]
    (tmp_path / "loop.toml").write_text('[recipe]\ninclude = "loop.toml"\n' + DATA)
    with pytest.raises(InputError, match="includes itself"):
        load_recipe(tmp_path / "loop.toml")
    (tmp_path / "gone.toml").write_text('[recipe]\ninclude = "nope.toml"\n' + DATA)
    with pytest.raises(InputError, match="nope.toml.*included by"):
        load_recipe(tmp_path / "gone.toml")
    (tmp_path / "dup.toml").write_text('[recipe]\ninclude = "base.toml"\n' + DATA)
    with pytest.raises(InputError, match="duplicate step name 'data'"):
        load_recipe(tmp_path / "dup.toml")


def test_ablation_reuses_the_demo_steps_unchanged():
    """The ablation's raw web and CapFilt columns are the demo's A and B: the same steps with the same signatures,
    so after `make demo` they are skipped."""
    from blipctl.recipe import signature

    def sigs(path):
        out, r = {}, load_recipe(path)
        for st in r.steps:
            out[st.name] = signature(st, out)
        return out

    demo, ablation = sigs(ROOT / "recipes" / "demo.toml"), sigs(ROOT / "recipes" / "ablation.toml")
    assert {k: ablation[k] for k in demo} == demo
    assert len(ablation) == len(demo) + 11
    # every column gets A's pre-training and captioner budget: only the data differs
    by = {s.name: s.params for s in load_recipe(ROOT / "recipes" / "ablation.toml").steps}

    def same(p):
        return {k: (v if k != "data" else {**v, "train": None}) for k, v in p.items() if k not in ("init", "out")}

    for col in ("filt", "cap"):
        assert same(by[f"pretrain_{col}"]) == same(by["pretrain_a"]), col
        assert by[f"pretrain_{col}"]["init"] == by["pretrain_a"]["init"]
        assert same(by[f"captioner_{col}"]) == same(by["captioner_a"]), col
    assert by["capfilt_filt"]["num_captions"] == 0 and by["capfilt_cap"]["threshold"] == 0.0
    assert by["retrieval_filt"]["k"] == by["retrieval_cap"]["k"] == by["retrieval_a"]["k"]
    for key in ("captioner", "filter", "top_p", "seed", "max_length"):
        assert by["capfilt_filt"][key] == by["capfilt_cap"][key] == by["capfilt"][key], key
