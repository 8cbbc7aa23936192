"""Caption cleaning and image transforms against the original BLIP rules."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from blip.data.text import pre_caption
from blip.data.transforms import CLIP_MEAN, CLIP_STD, RandomAugment, eval_transform, to_rgb, train_transform


def original_pre_caption(caption: str, max_words: int = 50) -> str:
    """salesforce/BLIP data/utils.py, verbatim apart from formatting."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    caption_words = caption.split(" ")
    if len(caption_words) > max_words:
        caption = " ".join(caption_words[:max_words])
    return caption


TRICKY = {
    "A Dog!!  Runs.": "a dog runs",
    "Hello.World": "hello world",
    '#hashtag: (quoted) "text" ~ *star*;': "hashtag quoted text star",
    "It's a dog, isn't it?": "it's a dog, isn't it?",
    "  leading and trailing  ": "leading and trailing",
    "ends with newline\n": "ends with newline",
    "a\n\nb": "a b",
    "tab\tseparated": "tab\tseparated",  # a single whitespace character is not collapsed
    "word\t": "word\t",  # ... nor stripped: strip(" ") only removes spaces
    "x \n": "x",
    "...": "",
    "CAFÉ Über": "café über",
    "a  b  c": "a b c",
}


@pytest.mark.parametrize("raw,expected", TRICKY.items())
def test_pre_caption_tricky_strings(raw, expected):
    assert pre_caption(raw) == expected
    assert pre_caption(raw) == original_pre_caption(raw, 30)


def test_pre_caption_truncates_to_max_words():
    words = " ".join(f"w{i}" for i in range(45))
    assert pre_caption(words) == " ".join(f"w{i}" for i in range(30))
    assert pre_caption(words, max_words=50) == words
    assert pre_caption("one  two three", max_words=2) == "one two"
    # the original counts single-space-separated tokens; a tab-joined pair is one word
    assert pre_caption("a\tb c d", max_words=2) == original_pre_caption("a\tb c d", 2) == "a\tb c"


def test_pre_caption_matches_original_on_random_strings():
    rng = np.random.default_rng(0)
    alphabet = list("abcXYZ .!\"()*#:;~,'\n\t  ")
    for _ in range(300):
        s = "".join(rng.choice(alphabet, size=int(rng.integers(0, 60))))
        n = int(rng.integers(1, 12))
        assert pre_caption(s, n) == original_pre_caption(s, n), repr(s)


@pytest.mark.parametrize("size", [(50, 30), (300, 200), (64, 64)])
def test_eval_transform_is_pil_bicubic_resize_then_clip_normalisation(size):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    s = 48
    got = eval_transform(s)(img)
    ref = np.asarray(img.resize((s, s), Image.BICUBIC), dtype=np.float32) / 255.0
    ref = (ref - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    ref = torch.from_numpy(ref).permute(2, 0, 1)
    assert got.dtype == torch.float32 and got.shape == (3, s, s)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_clip_constants():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_train_transform_shape_and_seeded_determinism():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8), "RGB")
    tf = train_transform(32, min_scale=0.5)
    torch.manual_seed(7)
    a = tf(img)
    torch.manual_seed(7)
    b = tf(img)
    torch.manual_seed(8)
    c = tf(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_train_transform_without_augmentation_is_crop_and_normalise():
    tf = train_transform(16, min_scale=1.0, randaugment=False, hflip=False)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["Lambda", "RandomResizedCrop", "ToTensor", "Normalize"]
    assert "RandomHorizontalFlip" in [type(t).__name__ for t in train_transform(16).transforms]


def test_random_augment_uses_the_original_op_list_and_magnitudes():
    aug = RandomAugment()
    space = aug.op._augmentation_space(11, (32, 32))
    assert set(space) == {
        "Identity",
        "AutoContrast",
        "Brightness",
        "Sharpness",
        "Equalize",
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Rotate",
    }
    m = aug.op.magnitude
    assert (aug.num_ops, m, aug.p) == (2, 5, 0.5)
    assert float(space["Rotate"][0][m]) == pytest.approx(15.0)  # degrees
    assert float(space["ShearX"][0][m]) == pytest.approx(0.15)
    assert float(space["TranslateX"][0][m]) == pytest.approx(5.0)  # pixels
    assert float(space["Brightness"][0][m]) == pytest.approx(0.0, abs=1e-6)  # factor 1.0: a no-op, as the original
    assert aug.op.fill == [128, 128, 128]


def test_random_augment_with_p0_is_identity_and_changes_images_otherwise():
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB")
    assert RandomAugment(p=0.0)(img) is img
    torch.manual_seed(0)
    changed = sum(np.array_equal(np.asarray(RandomAugment(p=1.0)(img)), np.asarray(img)) is False for _ in range(20))
    assert changed >= 10


def _arr(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def test_to_rgb_modes():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L")
    assert (_arr(to_rgb(gray))[..., 0] == np.asarray(gray)).all()

    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent: white, not the hidden colour
    assert (_arr(to_rgb(rgba)) == 255).all()
    opaque = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert (_arr(to_rgb(opaque)) == (10, 20, 30)).all()

    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
    assert (_arr(to_rgb(cmyk)) == (255, 0, 0)).all()

    i16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert i16.mode == "I;16"
    assert (_arr(to_rgb(i16)) == 255).all()
    mid = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))  # 128 * 257
    assert (_arr(to_rgb(mid)) == 128).all()  # scaled, not clipped to white

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    assert (_arr(to_rgb(pal)) == (0, 0, 255)).all()
    pal.info["transparency"] = 1
    assert (_arr(to_rgb(pal)) == 255).all()

    assert (_arr(to_rgb(Image.new("1", (4, 4), 1))) == 255).all()
    assert (_arr(to_rgb(Image.new("LA", (4, 4), (0, 255)))) == 0).all()
    assert (_arr(to_rgb(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)))) == 128).all()
    rgb = Image.new("RGB", (2, 2))
    assert to_rgb(rgb) is rgb
