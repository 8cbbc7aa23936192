"""Generation details not covered by the transformers parity tests: nucleus filtering and sampling."""

from __future__ import annotations

import pytest
import torch
from helpers import sharpen, tiny_tokenizer

from blip.config import BlipConfig, TextConfig, VisionConfig
from blip.generation import GenerationConfig, _nucleus, generate
from blip.model import BLIP


def full_sort_nucleus(logits: torch.Tensor, p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=False)
    drop = sorted_logits.softmax(-1).cumsum(-1) <= (1 - p)
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))


@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])
@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_nucleus_fast_path_equals_full_sort(scale, p):
    torch.manual_seed(0)
    x = torch.randn(8, 3000) * scale
    got = _nucleus(x, GenerationConfig(top_p=p))
    want = full_sort_nucleus(x, p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[torch.isfinite(got)], x[torch.isfinite(want)])


@pytest.fixture(scope="module")
def captioner():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = BlipConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=4, mlp_dim=64),
        text=TextConfig(vocab_size=len(tok), hidden=32, layers=2, heads=4, mlp_dim=64, max_positions=64),
        text_encoder=False,
        bos_token_id=tok.bos_id,
        pad_token_id=tok.pad_id,
        sep_token_id=tok.sep_id,
    )
    m = BLIP(cfg).eval()
    sharpen(m)
    return m, tok


def test_sampling_is_seeded_and_varied(captioner):
    m, tok = captioner
    emb = m.encode_image(torch.randn(2, 3, 32, 32))
    cfg = GenerationConfig(do_sample=True, top_p=0.9, num_return_sequences=4, max_length=15, min_length=3)
    a = generate(m, emb, [tok.bos_id], cfg, generator=torch.Generator().manual_seed(1))
    b = generate(m, emb, [tok.bos_id], cfg, generator=torch.Generator().manual_seed(1))
    c = generate(m, emb, [tok.bos_id], cfg, generator=torch.Generator().manual_seed(2))
    assert a == b and a != c
    assert len(a) == 2 and all(len(x) == 4 for x in a)
    assert all(2 <= len(s) <= 14 for x in a for s in x)  # min/max count [DEC]; [SEP] is stripped
    assert len({tuple(s) for s in a[0]}) > 1  # several different captions per image


def test_tiny_top_p_is_greedy(captioner):
    m, tok = captioner
    emb = m.encode_image(torch.randn(3, 3, 32, 32))
    greedy = generate(m, emb, [tok.bos_id], GenerationConfig(num_beams=1, max_length=12, min_length=3))
    nucleus = generate(
        m,
        emb,
        [tok.bos_id],
        GenerationConfig(do_sample=True, top_p=1e-6, max_length=12, min_length=3),
        generator=torch.Generator().manual_seed(0),
    )
    assert greedy == nucleus
