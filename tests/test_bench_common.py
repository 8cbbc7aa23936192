"""benchmarks/common.py: the roofline never gives a share of an emulated bf16 matmul (a CPU without avx512_bf16/amx
runs bf16 at ~1 GFLOP/s, far below what the model's own bf16 calls reach: a share of it once read 6284%)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402


def test_fraction_of_a_native_roofline_and_none_of_an_emulated_one():
    roof = common.Roofline({"fp32": 200.0, "bf16": 0.3}, 2048, frozenset({"bf16"}))
    assert roof.fraction(150.0, "fp32") == " = 75% of the fp32 roofline"
    assert roof.share(19.0, "bf16") is None
    assert "%" not in roof.fraction(19.0, "bf16") and "emulated" in roof.fraction(19.0, "bf16")
    assert "bf16 0.3 GFLOP/s (emulated" in roof.line()  # three significant digits: not "0 GFLOP/s"
    assert "fp32 1234 GFLOP/s" in common.Roofline({"fp32": 1234.4}, 8192).line()  # a GPU's: not "1.23e+03"
    assert "%" not in common.rate(2.0, 38 * 10**9, roof, "bf16")
    assert common.rate(2.0, 300 * 10**9, roof, "fp32").endswith("= 75% of the fp32 roofline")
    native = common.Roofline({"fp32": 200.0, "bf16": 400.0}, 2048)
    assert native.fraction(100.0, "bf16") == " = 25% of the bf16 roofline"


@pytest.mark.parametrize("native", [True, False])
def test_measure_marks_bf16_emulated_exactly_on_cpus_without_it(monkeypatch, native):
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: native)
    sizes = []
    randn = common.torch.randn
    monkeypatch.setattr(common.torch, "randn", lambda *s, **kw: sizes.append((s[0], kw["dtype"])) or randn(*s, **kw))
    roof = common.Roofline.measure("cpu", n=640, reps=1)
    assert set(roof.gflops) == {"fp32", "bf16"} and all(v > 0 for v in roof.gflops.values())
    assert roof.emulated == (frozenset() if native else frozenset({"bf16"}))
    # an emulated bf16 matmul is measured small (one at 2048^3 took minutes), the native ones at the size asked
    bf16 = 640 if native else 512
    assert sizes == [(640, common.torch.float32)] * 2 + [(bf16, common.torch.bfloat16)] * 2
    assert ("640^3" in roof.line()) and (native or "512^3, not a roofline" in roof.line())
