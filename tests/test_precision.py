"""Reduced precision: `auto` picks bf16 only where the hardware has it, and bf16 results stay close to fp32.

The tolerances are a few times what these seeds measure on an AMD EPYC with AVX512-BF16 (torch 2.14), stated
next to each; bf16 keeps 8 bits of mantissa, so some drift is expected and the point is that it stays small.
"""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import config_dict, micro_init, read_metrics, sharpen, synthetic_loader

from blip.checkpoint import load_model
from blip.config import model_config
from blip.errors import InputError
from blip.generation import GenerationConfig, generate
from blip.model import BLIP
from blip.precision import autocast, cpu_has_native_bf16, name, resolve
from blip.train import train
from blip.train_config import build_config

VOCAB = 1000


# ---- auto resolution -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),  # AMD Zen 4, Intel Cooper Lake
        ({"avx2", "avx512f", "amx_tile", "amx_bf16"}, torch.bfloat16),  # Intel Sapphire Rapids
        ({"avx2", "avx512f", "avx512bw", "avx512vl"}, torch.float32),  # AVX-512 without BF16: emulated, slow
        ({"avx2", "fma"}, torch.float32),
        (set(), torch.float32),  # no /proc/cpuinfo (macOS) or unknown flags
    ],
)
def test_auto_on_cpu_is_bf16_only_with_native_bf16(flags, expected):
    assert resolve("auto", "cpu", cpu_flags=flags) == expected
    assert cpu_has_native_bf16(flags) == (expected == torch.bfloat16)


def test_explicit_choices_and_bad_values():
    assert resolve("fp32", "cpu", cpu_flags={"avx512_bf16"}) == torch.float32
    assert resolve("bf16", "cpu", cpu_flags=set()) == torch.bfloat16  # asked for: allowed, even if emulated
    assert resolve("auto", "meta") == torch.float32
    assert name(resolve("fp16", "cpu")) == "fp16"
    with pytest.raises(InputError, match="train.precision"):
        resolve("fp8", "cpu", key="train.precision")


def test_this_machine_auto_follows_its_flags():
    """No injected flags: the answer must follow /proc/cpuinfo (bf16 on this project's AVX512-BF16 machines)."""
    flags = set(open("/proc/cpuinfo").read().split()) if sys.platform == "linux" else set()
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert resolve("auto", "cpu") == (torch.bfloat16 if native else torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_on_cuda():
    assert resolve("auto", "cuda") == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)


# ---- bf16 against fp32 -----------------------------------------------------------------------------------------
def _tiny(seed: int = 0, factor: float = 1.0) -> BLIP:
    """The `tiny` size (ViT 2 x 256, text 2 x 256) at 64 px, random weights scaled by `factor`."""
    torch.manual_seed(seed)
    m = BLIP(model_config("tiny", vocab_size=VOCAB, image_size=64)).eval()
    sharpen(m, factor, seed)
    return m


def _inputs(n: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(n, 3, 64, 64, generator=g)
    ids = torch.randint(5, VOCAB - 2, (n, 12), generator=g)
    return px, ids, torch.ones_like(ids)


def test_bf16_itm_scores_match_fp32():
    """ITM p(match) within 0.01 absolute (measured max 0.0052, mean 0.0020, over 32 pairs spread 0.24-0.83)."""
    m = _tiny(factor=3.0)  # sharpened: the scores spread over most of (0, 1) instead of sitting near 0.5
    px, ids, mask = _inputs()
    p = {}
    for dt in (torch.float32, torch.bfloat16):
        with torch.no_grad(), autocast("cpu", dt):
            logits = m.itm_logits(ids, mask, image_embeds=m.encode_image(px))
        p[dt] = logits.float().softmax(-1)[:, 1]
    assert float(p[torch.float32].max() - p[torch.float32].min()) > 0.3  # the comparison spans real scores
    diff = (p[torch.float32] - p[torch.bfloat16]).abs()
    assert float(diff.max()) < 0.01, f"max |p_bf16 - p_fp32| = {float(diff.max()):.4f}"


def test_bf16_greedy_captions_agree_with_fp32_on_most_tokens():
    """Greedy captions, 32 images x 16 new tokens: 84% of the tokens come before the first bf16/fp32 divergence
    (88% agree position by position) on these seeds; required: 75%.

    A random model's next-token distribution is nearly flat, so near-ties (where bf16 rounding may flip the
    argmax) are far more common than in a trained captioner; the base-size benchmark reports the rate there.
    """
    m = _tiny()
    px, _, _ = _inputs()
    cfg = GenerationConfig(num_beams=1, max_length=17, min_length=17)
    caps = {}
    for dt in (torch.float32, torch.bfloat16):
        with torch.no_grad(), autocast("cpu", dt):
            caps[dt] = [c[0] for c in generate(m, m.encode_image(px), [VOCAB - 2], cfg)]
    a, b = caps[torch.float32], caps[torch.bfloat16]
    total = sum(len(x) for x in a)
    assert total == 32 * 16

    def agreed(x: list[int], y: list[int]) -> int:  # tokens before the first divergence
        return next((i for i, (s, t) in enumerate(zip(x, y, strict=True)) if s != t), len(x))

    prefix = sum(agreed(x, y) for x, y in zip(a, b, strict=True))
    assert prefix / total >= 0.75, f"only {prefix / total:.1%} of the tokens precede the first divergence"
    assert a != b or prefix == total  # (the rate is computed, not assumed)


def test_bf16_decoding_casts_each_weight_once_per_call():
    """Autocast caches a weight's bf16 copy only outside inference mode: generate runs under no_grad, so the LM head
    (vocab x hidden) is cast once per call, not once per decoding step (it was 16 times for 16 steps)."""
    from torch.profiler import ProfilerActivity, profile

    m = _tiny()
    px, _, _ = _inputs(4)
    head = list(m.text_decoder.cls.predictions.decoder.weight.shape)
    for steps in (4, 12):
        cfg = GenerationConfig(num_beams=2, max_length=steps + 1, min_length=steps + 1)
        with autocast("cpu", torch.bfloat16), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            generate(m, m.encode_image(px), [VOCAB - 2], cfg)
        casts = [e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes[:1] == [head]]
        assert len(casts) == 1, f"{steps} steps: the {head} LM head was cast {len(casts)} times"


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    return micro_init(tmp_path_factory.mktemp("init") / "micro")


def test_bf16_training_loss_tracks_fp32(tmp_path, init_dir):
    """Pre-training the micro model 16 steps: bf16 autocast (fp32 master weights) against fp32, same data and seed.

    Every step's loss within 0.05 of fp32's (measured: max |diff| 0.011, losses 8.7 -> 6.2), and bf16's loss
    falls at least 80% as much as fp32's.
    """
    losses = {}
    for p in ("fp32", "bf16"):
        sections = {"train": {"precision": p, "max_steps": 16}}
        cfg = build_config("pretrain", config_dict("pretrain", init_dir, tmp_path / p, **sections))
        result = train(cfg, loader_fn=synthetic_loader(8, prompt=cfg.data.prompt))
        assert result["step"] == 16
        losses[p] = [r["loss"] for r in read_metrics(tmp_path / p)]
    f, b = torch.tensor(losses["fp32"]), torch.tensor(losses["bf16"])
    assert len(f) == len(b) == 16
    assert float((f - b).abs().max()) <= 0.05, f"max |diff| {float((f - b).abs().max()):.4f}"
    assert not torch.equal(f, b)  # bf16 really ran (its rounding shows in the losses)
    drop_f, drop_b = float(f[:4].mean() - f[-4:].mean()), float(b[:4].mean() - b[-4:].mean())
    assert drop_f > 0 and drop_b > 0.8 * drop_f, (drop_f, drop_b)
    # the saved weights are the fp32 master weights, not bf16 copies
    assert {p.dtype for p in load_model(tmp_path / "bf16").model.parameters()} == {torch.float32}
