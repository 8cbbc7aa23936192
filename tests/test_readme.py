"""The README's Python block runs end to end, on tiny models and shards built here (the hub ids in it are
replaced by their directories; `photo.jpg` and `web/` are made in the working directory)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
from helpers import hf_model, tiny_tokenizer
from PIL import Image

from blip.data.shards import write_shard

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _png(seed: int) -> bytes:
    arr = (np.random.default_rng(seed).random((40, 40, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_the_readme_python_block_runs(tmp_path, monkeypatch, capsys):
    (block,) = python_blocks()
    tok = tiny_tokenizer()
    hf_model("caption", tok, tmp_path / "cap")
    hf_model("retrieval", tok, tmp_path / "itm")
    Image.open(io.BytesIO(_png(0))).save(tmp_path / "photo.jpg")
    for s in range(2):
        samples = [
            {"__key__": f"s{s}{i}", "png": _png(10 * s + i), "txt": "a red circle on the left", "json": {}}
            for i in range(3)
        ]
        write_shard(tmp_path / "web" / f"web-{s:05d}.tar", samples)
    code = block.replace("Salesforce/blip-image-captioning-base", str(tmp_path / "cap"))
    code = code.replace("Salesforce/blip-itm-base-coco", str(tmp_path / "itm"))
    assert code != block and "Salesforce/" not in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5  # two caption lists, two score lines, the counts
    assert printed[2].startswith("a dog on a beach: ITM p(match) 0.")
    summary = json.loads((tmp_path / "clean" / "capfilt.json").read_text())
    assert summary["complete"] and summary["images_in"] == 6
    assert summary["counts"]["synthetic"]["in"] == 6  # one synthetic caption per web image
    assert sorted(p.name for p in (tmp_path / "clean").glob("*.tar")) == ["web-00000.tar", "web-00001.tar"]
