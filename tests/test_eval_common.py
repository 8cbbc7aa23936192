"""Shared builders for the evaluation tests (tiny models, made in the test, no network) and tests of the plumbing."""

from __future__ import annotations

import torch
from helpers import hf_config, sharpen

from blip.config import BlipConfig, TextConfig, VisionConfig
from blip.distributed import my_batches
from blip.eval.common import image_batches
from blip.model import BLIP
from blip.tokenizer import Tokenizer

CAPTIONS = [
    "a red circle on the left",
    "a small blue square",
    "there is a big green star at the top",
    "a yellow triangle on the right",
    "a picture of a red star",
    "a blue circle at the bottom",
    "two green squares",
    "a small yellow circle on the left",
]


def tiny_tok() -> Tokenizer:
    words = " ".join(CAPTIONS).split()
    return Tokenizer.train(CAPTIONS * 3 + words, vocab_size=100)


def hf_retrieval_model(tok: Tokenizer, seed: int = 0, image_size: int = 32):
    """A tiny random transformers BlipForImageTextRetrieval (helpers.hf_config), every matrix drawn at std 0.1."""
    from transformers import BlipForImageTextRetrieval

    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(hf_config(tok, image_size)).eval()
    with torch.no_grad():  # HF initialises the vision tower at std 1e-10: every image would look the same
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    return model


def native_config(tok: Tokenizer, image_size: int = 32) -> BlipConfig:
    return BlipConfig(
        vision=VisionConfig(image_size=image_size, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64),
        text=TextConfig(vocab_size=len(tok), hidden=32, layers=2, heads=4, mlp_dim=64, max_positions=64),
        embed_dim=16,
        bos_token_id=tok.bos_id,
        enc_token_id=tok.enc_id,
        pad_token_id=tok.pad_id,
        cls_token_id=tok.cls_id,
        sep_token_id=tok.sep_id,
    )


def native_model(tok: Tokenizer, seed: int = 0) -> BLIP:
    """A tiny blipctl BLIP with encoder and decoder (retrieval and captioning)."""
    torch.manual_seed(seed)
    model = BLIP(native_config(tok)).eval()
    sharpen(model)
    return model


def pixels(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


# ---- tests of the plumbing ---------------------------------------------------------------------------------------
def test_batches_are_round_robin_and_cover_everything():
    assert my_batches(10, 3, 0, 1) == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    r0, r1 = my_batches(10, 3, 0, 2), my_batches(10, 3, 1, 2)
    assert r0 == [range(0, 3), range(6, 9)] and r1 == [range(3, 6), range(9, 10)]
    assert my_batches(2, 3, 1, 2) == []


def test_image_batches_from_a_dataset_keep_batch_boundaries():
    px = pixels(7, size=8)
    ds = torch.utils.data.TensorDataset(px)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds[i][0]

    for rank in (0, 1):
        got = list(image_batches(Items(), 2, rank, 2))
        want = list(image_batches(px, 2, rank, 2))
        assert [r for r, _ in got] == [r for r, _ in want]
        for (_, a), (_, b) in zip(got, want, strict=True):
            assert torch.equal(a, b)
