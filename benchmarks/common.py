"""What every benchmark prints with its times: the machine, its load, a measured matmul roofline, and FLOP rates.

A time alone says little on a shared CPU: next to each one the benchmarks print the work it did (FLOPs counted
by torch.utils.flop_counter: matmuls, convolutions and attention; elementwise ops are not counted), the rate
achieved, and that rate as a fraction of what a large matmul reaches on this machine right now, in the same
precision. Comparisons against a peer run both sides in the same process, alternating repetitions (`interleave`),
so a change in the machine's load hits both.

    from common import Roofline, count_flops, header, interleave, rate
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from blip.precision import cpu_flags, cpu_has_native_bf16

FLAGS_THAT_MATTER = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def machine_line(device: str = "cpu") -> str:
    """One line: CPU (or GPU), the flags that matter for bf16, core count, torch threads, torch, load."""
    flags = [f for f in FLAGS_THAT_MATTER if f in cpu_flags()]
    native = "native bf16" if cpu_has_native_bf16() else "no native bf16 (auto = fp32)"
    line = (
        f"CPU: {cpu_model()}, {os.cpu_count()} cores, flags {' '.join(flags) or '-'} ({native}); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        line = f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB; " + line
    return line


@dataclass
class Roofline:
    """Measured GFLOP/s of an n x n x n matmul per dtype (the best of a few repetitions).

    On a CPU without bf16 in hardware (no avx512_bf16/amx) bf16 is emulated: its matmul runs at a fraction of a
    GFLOP/s at 2048^3 (4 minutes for the measurement) and below what the model's small bf16 matmuls reach, so it is
    no roofline. It is measured at EMULATED_N^3 for the record and listed in `emulated`; `fraction` gives no share of
    it."""

    EMULATED_N: ClassVar[int] = 512

    gflops: dict[str, float]
    n: int
    emulated: frozenset[str] = frozenset()

    @classmethod
    def measure(cls, device: str = "cpu", n: int = 2048, reps: int = 3, dtypes=("fp32", "bf16")) -> Roofline:
        out, emulated = {}, set()
        for name in dtypes:
            dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
            m = n
            if name == "bf16" and not str(device).startswith("cuda") and not cpu_has_native_bf16():
                emulated.add(name)
                m = min(n, cls.EMULATED_N)
            a = torch.randn(m, m, device=device, dtype=dt)
            b = torch.randn(m, m, device=device, dtype=dt)
            a @ b  # warm-up (kernel selection)
            best = float("inf")
            for _ in range(reps):
                _sync(device)
                t0 = time.perf_counter()
                a @ b
                _sync(device)
                best = min(best, time.perf_counter() - t0)
            out[name] = 2 * m**3 / best / 1e9
        return cls(out, n, frozenset(emulated))

    def line(self) -> str:
        emulated = f" (emulated: no bf16 in this CPU; {min(self.n, self.EMULATED_N)}^3, not a roofline)"
        parts = ", ".join(
            f"{k} {_gflops(v)} GFLOP/s{emulated if k in self.emulated else ''}" for k, v in self.gflops.items()
        )
        return f"roofline ({self.n}^3 matmul, measured now): {parts}"

    def share(self, gflops: float, precision: str) -> float | None:
        """`gflops` as a fraction of this precision's roofline; None where there is none (not measured, emulated)."""
        if precision not in self.gflops or precision in self.emulated:
            return None
        return gflops / self.gflops[precision]

    def fraction(self, gflops: float, precision: str) -> str:
        """' = 87% of the fp32 roofline', or why there is no such share."""
        if precision in self.emulated:
            return f" ({precision} emulated here: no roofline)"
        share = self.share(gflops, precision)
        return "" if share is None else f" = {share:.0%} of the {precision} roofline"


def _gflops(v: float) -> str:
    """'187', '1.34': whole numbers down to 10, three significant digits below (an emulated bf16 matmul)."""
    return f"{v:.0f}" if v >= 10 else f"{v:.3g}"


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (matmul/conv/attention, forward and any backward it runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    with fc:
        fn()
    return fc.get_total_flops()


def rate(seconds: float, flops: int | None, roof: Roofline | None, precision: str = "fp32") -> str:
    """'12.3 s, 140 GFLOP/s = 87% of the fp32 roofline' (FLOP parts only when known)."""
    s = f"{seconds:.2f} s"
    if flops:
        g = flops / seconds / 1e9
        s += f", {g:.0f} GFLOP/s"
        if roof is not None:
            s += roof.fraction(g, precision)
    return s


def interleave(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1, log: bool = True) -> dict[str, list]:
    """Run each function `warmup` times untimed, then `reps` rounds alternating between them (ABAB..., the order
    reversed every other round); returns each one's list of seconds."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for k in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
            if log:
                print(f"  rep {r}: {k:<24} {times[k][-1]:7.2f} s   (load {loadavg()})", flush=True)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def header(device: str = "cpu", roofline: bool = True, n: int = 2048) -> Roofline | None:
    """Print the machine line, the load, and (measured now) the roofline; returns the roofline."""
    print(machine_line(device), flush=True)
    print(f"load average (1/5/15 min): {loadavg()}", flush=True)
    if not roofline:
        return None
    roof = Roofline.measure(device if device.startswith("cuda") else "cpu", n=n)
    print(roof.line(), flush=True)
    return roof
