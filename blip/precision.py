"""Numeric precision: which dtype a run computes in, and the autocast context that applies it.

One rule for every entry point (captioning, ITM/ITC scoring, CapFilt, the evaluations, training):
- `fp32`: plain float32.
- `bf16`: bfloat16 autocast (matmuls, convolutions and attention in bf16; norms, softmax outputs and losses stay
  float32). Weights stay float32, so training keeps fp32 master weights and optimizer state.
- `auto`: bf16 where the hardware computes it natively, else fp32: CUDA devices that support bf16; CPUs whose
  flags include AVX512-BF16 or AMX-BF16. Elsewhere bf16 is emulated (slower than fp32), so `auto` never picks it.
- `fp16` (training only): float16 autocast with a GradScaler.

Inference runs under `torch.no_grad()`, not `torch.inference_mode()`: autocast caches each weight's bf16 copy for
the whole context only outside inference mode. Inside it every Linear call casts its weight again (measured: 3 casts
per call instead of 1; base captioning re-cast the 30524 x 768 LM head at every decoding step, 0.44 s of 7 s).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from functools import lru_cache
from typing import Literal

import torch

from blip.errors import InputError

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""/proc/cpuinfo flags of x86 CPUs with bf16 arithmetic in hardware (AMD Zen 4+, Intel Cooper Lake+, AMX)."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16(flags: Iterable[str] | None = None) -> bool:
    """True when the CPU computes bf16 in hardware (`flags` defaults to this machine's)."""
    return bool(NATIVE_BF16_CPU_FLAGS & set(cpu_flags() if flags is None else flags))


def resolve(
    precision: str, device: torch.device | str, *, key: str = "precision", cpu_flags: Iterable[str] | None = None
) -> torch.dtype:
    """The compute dtype for `precision` on `device`. `key` names the parameter in errors; `cpu_flags` overrides
    this machine's flags (tests)."""
    allowed = (*PRECISIONS, "fp16")
    if precision not in allowed:
        raise InputError(f"{key} must be one of {', '.join(allowed)}, not {precision!r}", param=key)
    dev = torch.device(device)
    if precision == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if dev.type == "cpu":
            return torch.bfloat16 if cpu_has_native_bf16(cpu_flags) else torch.float32
        return torch.float32
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"{key}=bf16: this GPU does not support bfloat16 (use fp32)", param=key)
    return _DTYPES[precision]


def name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (for logs and benchmark output)."""
    return {v: k for k, v in _DTYPES.items()}[dtype]


def autocast(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device` (nothing for float32).

    Wrap a whole call (e.g. all of a generation): autocast caches each weight's bf16 copy for as long as the
    context is open, so decoding steps inside one context cast the weights once, not once per step.
    """
    dev = torch.device(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype)


def inference_context(precision: str, device: torch.device | str, *, key: str = "precision"):
    """`autocast(device, resolve(precision, device))`: the one-liner the inference entry points use."""
    return autocast(device, resolve(precision, device, key=key))
