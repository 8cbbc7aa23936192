"""benchmarks/bench_gpu.py's smoke mode: the GPU benchmark's whole path (pre-training step with bf16 autocast and
fused AdamW, CapFilt, retrieval; FLOP counting, MFU, peak memory) on CPU with a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke_runs_every_part_and_reports_rates(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--json-out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "CPU:" in r.stdout and "roofline" in r.stdout and "MFU" in r.stdout
    res = json.loads(out.read_text())
    assert [row["what"] for row in res["rows"]] == ["pretrain tiny bf16", "capfilt tiny bf16", "retrieval tiny bf16"]
    for row in res["rows"]:
        assert row["tflop_per_s"] > 0 and 0 < row["mfu"] and row["peak_mem_gib"] > 0, row
    assert res["roofline"]["bf16"] > 0 and res["peak_tflops"] > 0
