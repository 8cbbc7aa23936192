"""benchmarks/bench_attention.py --quick: each kernel runs in both precisions, agrees with fp32 SDPA, gets a ratio."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_attention_quick_reports_each_kernel_with_its_error():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--quick", "--reps", "1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.startswith("CPU:"), r.stdout[:200]
    errs = {
        (m[1], m[2].strip()): float(m[3])
        for m in re.finditer(r"(fp32|bf16) (sdpa[ a-z()]*?)\s+[\d.]+ ms.*?\| ([\d.e+-]+)", r.stdout)
    }
    assert set(errs) == {(p, k) for p in ("fp32", "bf16") for k in ("sdpa (default)", "sdpa math")}, r.stdout
    assert all(errs[("fp32", k)] < 1e-5 for k in ("sdpa (default)", "sdpa math")), errs
    assert all(errs[("bf16", k)] < 5e-2 for k in ("sdpa (default)", "sdpa math")), errs
    assert len(re.findall(r"bf16 vs fp32, .*: [\d.]+x", r.stdout)) == 3, r.stdout
