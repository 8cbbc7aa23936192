"""Caption evaluation as in the paper: beam-search captions for the test images, scored with the COCO metrics.

Generation follows the original (`a picture of ` prompt, 3 beams, lengths 5..20 counting the prompt tokens, the
prompt stripped from the caption, results de-duplicated by image id). Scoring calls pycocoevalcap's scorers
directly: `COCOEvalCap.evaluate()` always builds SPICE, which downloads Stanford CoreNLP on first use and so
fails offline. Same numbers: PTB tokenization, then Bleu(4), METEOR, ROUGE-L, CIDEr on the images of the results.
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from blip.errors import InputError
from blip.eval.common import (
    ImagesLike,
    PixelDataset,
    ProgressFn,
    image_batches,
    model_device,
)
from blip.eval.distributed import all_gather, broadcast_from_main, my_batches, rank_and_world
from blip.model.blip import BLIP
from blip.precision import autocast, resolve
from blip.tokenizer import Tokenizer

WarnFn = Callable[[str], None]


# ---- generation --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def generate_captions(
    model: BLIP,
    tokenizer: Tokenizer,
    images: ImagesLike,
    image_ids: Sequence[Any],
    *,
    prompt: str = "a picture of ",
    num_beams: int = 3,
    max_length: int = 20,
    min_length: int = 5,
    batch_size: int = 16,
    precision: str = "auto",
    num_workers: int = 0,
    progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """One caption per image: `[{"image_id", "caption"}]` in dataset order, de-duplicated by image id.

    precision: auto, fp32 or bf16 (blip.precision). Under torch.distributed each rank captions a share of the
    images and every rank returns all results.
    """
    from blip.generation import GenerationConfig, generate

    if not model.config.text_decoder:
        raise InputError("this model has no text decoder: it is a retrieval/filter model, not a captioner")
    if len(image_ids) != len(images):
        raise ValueError(f"{len(image_ids)} image ids for {len(images)} images")
    prompt_ids = tokenizer.encode_prompt(prompt)
    if max_length <= len(prompt_ids):
        raise InputError(f"--max-length {max_length} must exceed the prompt length ({len(prompt_ids)} tokens)")
    cfg = GenerationConfig(num_beams=num_beams, max_length=max_length, min_length=min_length)
    dev = model_device(model)
    dtype = resolve(precision, dev)
    rank, world = rank_and_world()
    report = progress or (lambda stage, n, total: None)
    mine: list[tuple[int, str]] = []
    total = sum(len(r) for r in my_batches(len(images), batch_size, rank, world))
    report("captions", 0, total)
    for r, px in image_batches(images, batch_size, rank, world, num_workers):
        with autocast(dev, dtype):
            out = generate(model, model.encode_image(px.to(dev)), prompt_ids, cfg)
        mine += [(i, tokenizer.decode(caps[0])) for i, caps in zip(r, out, strict=True)]
        report("captions", len(r), total)
    ordered = sorted(x for part in all_gather(mine) for x in part)
    return dedup_by_image([{"image_id": image_ids[i], "caption": c} for i, c in ordered])


def dedup_by_image(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Keep the first result of each image id (the original does this before scoring)."""
    seen: set = set()
    out = []
    for r in results:
        if r["image_id"] not in seen:
            seen.add(r["image_id"])
            out.append({"image_id": r["image_id"], "caption": r["caption"]})
    return out


# ---- scoring -----------------------------------------------------------------------------------------------------
_meteor = None  # one METEOR JVM per process: starting it and loading the paraphrase table takes ~10 s


def _get_meteor():
    global _meteor
    if _meteor is None:
        from pycocoevalcap.meteor.meteor import Meteor

        _meteor = Meteor()
    return _meteor


def _drop_meteor() -> None:
    """Forget a METEOR process that failed (its pipe state is unknown); the next call starts a fresh one."""
    global _meteor
    _meteor = None


def score_captions(
    results: Sequence[Mapping[str, Any]],
    gt: Mapping[str, Any],
    *,
    meteor: bool = True,
    spice: bool | None = None,
    warn: WarnFn | None = None,
) -> dict[str, float]:
    """COCO caption metrics of `results` (`[{"image_id", "caption"}]`) against COCO-format ground truth.

    Scored over the images of the results, as the original (`params['image_id'] = coco_result.getImgIds()`).
    Returns Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr (and SPICE when it runs). Without `java` on PATH, METEOR is
    skipped and a Python approximation of the PTB tokenizer is used, each with a warning. spice: None runs it
    only when Stanford CoreNLP is already installed; True requires it.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
    gts, res = _pair_up(dedup_by_image(results), gt)
    java = shutil.which("java") is not None
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        gts, res = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
    else:
        warn("java not found: BLEU/ROUGE/CIDEr use a Python approximation of the PTB tokenizer; METEOR skipped")
        gts, res = _simple_tokenize(gts), _simple_tokenize(res)

    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    if meteor and java:
        try:
            scores["METEOR"] = float(_get_meteor().compute_score(gts, res)[0])
        except Exception as e:  # noqa: BLE001 - keep the other metrics; say why this one is missing
            _drop_meteor()
            warn(f"METEOR failed and was skipped: {type(e).__name__}: {e}")
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    spice_score = _spice(gts, res, spice, java, warn)
    if spice_score is not None:
        scores["SPICE"] = spice_score
    return scores


def _pair_up(results, gt) -> tuple[dict, dict]:
    """{image_id: [{"caption"}...]} for the references and the results, over the results' images."""
    anns = gt.get("annotations") if isinstance(gt, Mapping) else None
    if not isinstance(anns, list):
        raise InputError('ground truth must be COCO format: {"annotations": [{"image_id", "caption"}, ...]}')
    refs: dict[Any, list[dict[str, str]]] = {}
    for a in anns:
        refs.setdefault(a["image_id"], []).append({"caption": a["caption"]})
    if not results:
        raise InputError("no captions to score (the results are empty)")
    unknown = [r["image_id"] for r in results if r["image_id"] not in refs]
    if unknown:
        raise InputError(
            f"{len(unknown)} result image_id(s) not in the ground truth, e.g. {unknown[:3]} "
            f"(results must correspond to the annotation file's images)"
        )
    gts = {r["image_id"]: refs[r["image_id"]] for r in results}
    res = {r["image_id"]: [{"caption": r["caption"]}] for r in results}
    return gts, res


_PUNCT = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"}  # pycocoevalcap's, lower-cased
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_WORD = re.compile(r"n't|'\w+|\w+(?=n't)|\w+(?:[-.]\w+)*|\.\.\.|--|[^\w\s]")


def _simple_tokenize(captions: dict) -> dict:
    """Close to `PTBTokenizer -lowerCase` + pycocoevalcap's punctuation removal, without Java.

    Splits clitics ("is n't", "dog 's"), keeps "cat-dog" and "3.5", writes brackets as -lrb- etc. (which
    pycocoevalcap keeps, as its punctuation list is upper-case). Rare forms ("cannot", "gonna") differ.
    """
    out = {}
    for k, caps in captions.items():
        out[k] = []
        for c in caps:
            toks = (_BRACKETS.get(t, t) for t in _WORD.findall(c["caption"].replace("\n", " ").lower()))
            out[k].append(" ".join(t for t in toks if t not in _PUNCT))
    return out


def _spice(gts, res, want: bool | None, java: bool, warn: WarnFn) -> float | None:
    """SPICE when it can run: pycocoevalcap's Spice() downloads Stanford CoreNLP unless it is already there."""
    if want is False:
        return None
    import pycocoevalcap

    lib = Path(next(iter(pycocoevalcap.__path__))) / "spice" / "lib"
    missing = "java not found" if not java else None
    if not missing and not (lib / "stanford-corenlp-3.6.0.jar").exists():
        missing = f"needs stanford-corenlp-3.6.0.jar and -models.jar in {lib} (pycocoevalcap downloads them)"
    if missing:
        if want:
            raise InputError(f"SPICE cannot run: {missing}")
        warn(f"SPICE skipped: {missing}")
        return None
    try:
        from pycocoevalcap.spice.spice import Spice

        return float(Spice().compute_score(gts, res)[0])
    except Exception as e:  # noqa: BLE001
        if want:
            raise
        warn(f"SPICE failed and was skipped: {type(e).__name__}: {e}")
        return None


# ---- the whole evaluation ----------------------------------------------------------------------------------------
def evaluate_caption(
    eval_set,
    model: BLIP,
    tokenizer: Tokenizer,
    *,
    prompt: str = "a picture of ",
    num_beams: int = 3,
    max_length: int = 20,
    min_length: int = 5,
    batch_size: int = 16,
    precision: str = "auto",
    num_workers: int = 0,
    meteor: bool = True,
    spice: bool | None = None,
    progress: ProgressFn | None = None,
    warn: WarnFn | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Caption an EvalSet (blip.data.datasets.load_eval_set) and score it: (metrics, results), on every rank.

    Only rank 0 runs the scorers (one METEOR JVM); the metrics are then broadcast.
    """
    from blip.data.transforms import eval_transform

    images = PixelDataset(eval_set, eval_transform(model.config.vision.image_size))
    results = generate_captions(
        model,
        tokenizer,
        images,
        eval_set.image_ids,
        prompt=prompt,
        num_beams=num_beams,
        max_length=max_length,
        min_length=min_length,
        batch_size=batch_size,
        precision=precision,
        num_workers=num_workers,
        progress=progress,
    )
    rank, _ = rank_and_world()
    metrics = score_captions(results, eval_set.gt, meteor=meteor, spice=spice, warn=warn) if rank == 0 else None
    return broadcast_from_main(metrics), results
