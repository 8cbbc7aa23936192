"""Shared test helpers (no test file imports another): tiny models and a tokenizer built in the tests (no network),
a micro BLIP with a learnable synthetic dataset for the training tests, and the torchrun worker.

Run as a script (`torchrun ... tests/helpers.py INIT OUT BATCH STEPS`) it is the distributed worker of
test_train_dist.py: every rank reads its slice of the same global batches, so a 2-process run and a 1-process run
with the same global batch see exactly the same data.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from blip.checkpoint import save_checkpoint  # noqa: E402
from blip.config import BlipConfig, TextConfig, VisionConfig  # noqa: E402
from blip.model.blip import BLIP  # noqa: E402
from blip.tokenizer import SPECIALS, Tokenizer  # noqa: E402

# ---- tiny models and images --------------------------------------------------------------------------------------
WORDS = (
    "a red blue green yellow circle square star triangle on the left right top bottom picture of small big there is"
).split()


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train([" ".join(WORDS)] * 5 + WORDS, vocab_size=100)


def hf_config(tok: Tokenizer, image_size: int = 32):
    from transformers import BlipConfig

    return BlipConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=tok.bos_id,
            pad_token_id=tok.pad_id,
            sep_token_id=tok.sep_id,
            eos_token_id=tok.sep_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
        ),
        image_text_hidden_size=16,
    )


def sharpen(model: torch.nn.Module, factor: float = 3.0, seed: int = 0) -> None:
    """HF's random init gives nearly flat logits; scale the matrices so decoding choices are clear-cut."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(factor)


def hf_model(kind: str, tok: Tokenizer, out: Path, seed: int = 0):
    """Build, sharpen and save a tiny BlipForConditionalGeneration ('caption') or BlipForImageTextRetrieval."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    torch.manual_seed(seed)
    cls = BlipForConditionalGeneration if kind == "caption" else BlipForImageTextRetrieval
    m = cls(hf_config(tok)).eval()
    with torch.no_grad():  # transformers initialises the vision tower with std 1e-10: every image would look alike
        for name, p in m.named_parameters():
            if name.startswith("vision_model") and p.dim() > 1:
                p.normal_(0.0, 0.05)
    sharpen(m)
    m.save_pretrained(out)
    tok.save(out)
    return m


def make_images(out: Path, n: int = 3, size: int = 48, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        arr[: size // 2, : size // 2] = rng.integers(0, 255, 3)  # a block of colour, so images differ clearly
        p = out / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


# ---- the micro BLIP and synthetic data of the training tests ------------------------------------------------------
COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}


def micro_tokenizer() -> Tokenizer:
    """A fixed WordPiece vocabulary (WordPiece *training* is not deterministic across processes): the words of
    the test captions and of the demo grammar, plus single characters so that any other word still encodes."""
    from blip.data import demo

    def strings(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            for k, v in x.items():
                yield from strings(k)
                yield from strings(v)
        elif isinstance(x, tuple | list):
            for v in x:
                yield from strings(v)

    grammar = (demo.COLORS, demo.SHAPE_WORDS, demo.SIZE_WORDS, demo.POSITION_WORDS, demo.BACKGROUND_WORDS)
    words = set(WORDS) | set(COLORS) | {"top", "bottom", "left", "right", "shapes", "two", "three", "and", "with"}
    words.update(w for phrase in strings(grammar) for w in phrase.split())
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = SPECIALS + sorted(w for w in words if w.isalpha()) + list(chars) + [f"##{c}" for c in chars]
    vocab = list(dict.fromkeys(vocab))
    with tempfile.TemporaryDirectory(prefix="micro_tok_") as d:
        (Path(d) / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
        return Tokenizer.from_pretrained(d)


def micro_config(tok, image_size: int = 32) -> BlipConfig:
    return BlipConfig(
        vision=VisionConfig(image_size=image_size, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128),
        text=TextConfig(vocab_size=len(tok), hidden=64, layers=2, heads=4, mlp_dim=128, max_positions=64),
        embed_dim=16,
        pad_token_id=tok.pad_id,
        cls_token_id=tok.cls_id,
        sep_token_id=tok.sep_id,
        bos_token_id=tok.bos_id,
        enc_token_id=tok.enc_id,
    )


def micro_init(out: Path, seed: int = 0) -> Path:
    """Save a micro pre-training model (encoder + decoder, shared) with the tiny tokenizer.

    The weights are scaled up (`sharpen`): at BERT's 0.02 init a text [CLS] barely depends on the words, and
    contrastive learning from such a cold start takes far more steps than a test can afford.
    """
    torch.manual_seed(seed)
    tok = micro_tokenizer()
    model = BLIP(micro_config(tok))
    sharpen(model, 3.0, seed)
    save_checkpoint(model, tok, out)
    return out


def synthetic_pairs(n: int = 64, size: int = 32, seed: int = 0):
    """n images: a coloured half (top / bottom / left / right) on black; caption "<colour> <half>".

    16 classes; image_id = class, so captions of the same class are positives for the filter. Captions are
    short so that a freshly initialised text encoder's [CLS] already varies with the words.
    """
    g = torch.Generator().manual_seed(seed)
    images, captions, ids = [], [], []
    h = size // 2
    halves = {"top": (slice(0, h), slice(None)), "bottom": (slice(h, None), slice(None))}
    halves |= {"left": (slice(None), slice(0, h)), "right": (slice(None), slice(h, None))}
    for i in range(n):
        c = i % 16
        color, half = list(COLORS)[c % 4], list(halves)[c // 4]
        img = 0.05 * torch.randn(3, size, size, generator=g)
        ys, xs = halves[half]
        img[:, ys, xs] += torch.tensor(COLORS[color]).view(3, 1, 1)
        images.append(img)
        captions.append(f"{color} {half}")
        ids.append(c)
    return torch.stack(images), captions, torch.tensor(ids)


def synthetic_loader(batch_size: int, n: int = 64, shuffle: bool = True, prompt: str = ""):
    """A loader_fn for blip.train.train: deterministic per epoch, sharded by slicing each global batch; like the
    real loader it prepends `prompt` (the captioner's "a picture of ")."""
    images, captions, ids = synthetic_pairs(n)
    captions = [prompt + c for c in captions]

    def loader_fn(epoch: int, skip_batches: int, rank: int, world_size: int):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)) if shuffle else torch.arange(n)
        gb = batch_size * world_size
        for k in range(skip_batches, n // gb):
            sel = order[k * gb + rank * batch_size : k * gb + (rank + 1) * batch_size]
            yield {
                "image": images[sel],
                "caption": [captions[i] for i in sel],
                "image_id": ids[sel],
                "key": [str(int(i)) for i in sel],
            }

    return loader_fn


def config_dict(task: str, init: Path, out: Path, **sections) -> dict:
    """A fast config for the micro model; `sections` are merged over it (e.g. train={"max_steps": 4})."""
    d = {
        "model": {"init": str(init), "image_size": 32, "grad_ckpt_layers": 0},
        "data": {"batch_size": 8, "num_samples": 64},
        "optim": {"lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 2},
        "loss": {"queue_size": 32},
        # fp32: `auto` would be bf16 on CPUs with AVX512-BF16 and fp32 elsewhere; the tests must not depend on it
        "train": {"out": str(out), "epochs": 3, "log_every": 1, "save_every": 0, "device": "cpu", "precision": "fp32"},
    }
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return d


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]


def _worker(
    init: str, out: str, batch: int, steps: int, negatives_all_ranks: str, padding: str = "max_length", swaps: str = ""
) -> None:
    """torchrun entry: pre-train the micro model on the synthetic data, `batch` pairs per rank.

    With padding "longest", one sample in 16 gets a longer caption, so ranks pad their batches to different
    lengths. With swaps "1", word-swap ITM negatives (`loss.word_swaps`) over the colours and halves."""
    from blip.train import train
    from blip.train_config import build_config

    torch.set_num_threads(1)
    cfg = build_config(
        "pretrain",
        config_dict(
            "pretrain",
            Path(init),
            Path(out),
            data={"batch_size": batch, "padding": padding},
            loss={
                "negatives_all_ranks": negatives_all_ranks == "1",
                "word_swaps": [list(COLORS), ["top", "bottom", "left", "right"]] if swaps == "1" else [],
            },
            train={"max_steps": steps, "epochs": 100},
        ),
    )
    loader_fn = synthetic_loader(batch, shuffle=True)
    if padding == "longest":
        base = loader_fn

        def loader_fn(**kw):  # noqa: ANN003
            for b in base(**kw):
                longer = [int(k) % 16 == 0 for k in b["key"]]
                b["caption"] = [c + " on a black background" * x for c, x in zip(b["caption"], longer, strict=True)]
                yield b

    train(cfg, loader_fn=loader_fn)


if __name__ == "__main__":
    _worker(*sys.argv[1:3], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:8])


# ---- CapFilt tests: a micro captioner and filter, and a random image -------------------------------------------
def capfilt_micro(tok, **kw) -> BlipConfig:
    """The micro BLIP the CapFilt tests use (32 px, one layer per tower)."""
    return BlipConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=4, mlp_dim=64),
        text=TextConfig(vocab_size=len(tok), hidden=32, layers=1, heads=4, mlp_dim=64, max_positions=64),
        embed_dim=16,
        bos_token_id=tok.bos_id,
        enc_token_id=tok.enc_id,
        pad_token_id=tok.pad_id,
        cls_token_id=tok.cls_id,
        sep_token_id=tok.sep_id,
        **kw,
    )


def capfilt_models(d: Path) -> tuple[Path, Path]:
    """A seeded micro captioner and a sharpened micro filter saved under `d`: (captioner dir, filter dir)."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cap = BLIP(capfilt_micro(tok, text_encoder=False))
    filt = BLIP(capfilt_micro(tok, text_decoder=False))
    sharpen(filt, 2.0)
    save_checkpoint(cap, tok, d / "captioner")
    save_checkpoint(filt, tok, d / "filter")
    return d / "captioner", d / "filter"


def png(seed: int) -> bytes:
    """A random 40x40 PNG."""
    import io

    arr = (np.random.default_rng(seed).random((40, 40, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---- evaluation tests: tiny models with encoder and decoder, pycocoevalcap fixtures -------------------------------
EVAL_CAPTIONS = [
    "a red circle on the left",
    "a small blue square",
    "there is a big green star at the top",
    "a yellow triangle on the right",
    "a picture of a red star",
    "a blue circle at the bottom",
    "two green squares",
    "a small yellow circle on the left",
]


def eval_tokenizer() -> Tokenizer:
    words = " ".join(EVAL_CAPTIONS).split()
    return Tokenizer.train(EVAL_CAPTIONS * 3 + words, vocab_size=100)


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


CAPTION_GT = {
    "images": [{"id": i} for i in (1, 2, 3, 4)],
    "annotations": [
        {"image_id": 1, "id": 1, "caption": "A red circle on the left."},
        {"image_id": 1, "id": 2, "caption": "a red round shape, left side"},
        {"image_id": 2, "id": 3, "caption": "Two small blue squares."},
        {"image_id": 2, "id": 4, "caption": "blue squares at the top"},
        {"image_id": 2, "id": 5, "caption": "there are two squares"},
        {"image_id": 3, "id": 6, "caption": "a green star"},
        {"image_id": 3, "id": 7, "caption": "A big green star in the middle!"},
        {"image_id": 4, "id": 8, "caption": "a yellow triangle"},
        {"image_id": 4, "id": 9, "caption": "yellow triangle on the right"},
    ],
}
CAPTION_RESULTS = [
    {"image_id": 1, "caption": "a red circle on the left"},
    {"image_id": 2, "caption": "two blue squares"},
    {"image_id": 3, "caption": "a green triangle in the middle"},
    {"image_id": 3, "caption": "a duplicate that must be ignored"},
    {"image_id": 4, "caption": "a yellow triangle on the right"},
]


def direct_scores(results, gt, meteor: bool):
    """pycocoevalcap's own pipeline minus SPICE, written out as COCOEvalCap.evaluate() does it."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    firsts = {}
    for r in results:
        firsts.setdefault(r["image_id"], r)
    gts = {i: [a for a in gt["annotations"] if a["image_id"] == i] for i in firsts}
    res = {i: [r] for i, r in firsts.items()}
    gts, res = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
    out = dict(
        zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], Bleu(4).compute_score(gts, res, verbose=0)[0], strict=True)
    )
    if meteor:
        out["METEOR"] = Meteor().compute_score(gts, res)[0]
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out
