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

from blip.distributed import all_gather, broadcast_from_main, my_batches, rank_and_world
from blip.errors import InputError
from blip.eval.common import (
    ImagesLike,
    PixelDataset,
    ProgressFn,
    image_batches,
    model_device,
)
from blip.model.blip import BLIP
from blip.precision import autocast, resolve
from blip.tokenizer import Tokenizer

WarnFn = Callable[[str], None]


# ---- generation --------------------------------------------------------------------------------------------------
@torch.no_grad()
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
    precision: str = "fp32",
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
        raise InputError(
            f"max_length {max_length} must exceed the prompt length ({len(prompt_ids)} tokens)", param="max_length"
        )
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
    precision: str = "fp32",
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


# ---- the verb: `blip.eval.caption(...)`, what `blipctl eval-caption` runs ------------------------------------
def run(
    dataset: str | None = None,
    model: Any = None,
    *,
    split: str = "test",
    data_root: str | None = None,
    num_beams: int = 3,
    max_length: int = 20,
    min_length: int = 5,
    prompt: str = "a picture of ",
    batch_size: int = 16,
    results_out: str | None = None,
    results: str | None = None,
    annotations: str | None = None,
    meteor: bool = True,
    spice: bool | None = None,
    tokenizer: str | None = None,
    image_size: int | None = None,
    device: str = "auto",
    num_workers: int | None = None,
    precision: str = "fp32",
    progress: ProgressFn | None = None,
    warn: WarnFn | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE when it can run) as in the paper: caption
    `dataset` with `model` (default Salesforce/blip-image-captioning-base), or score a COCO `results` file
    against `annotations` (or the dataset's ground truth). `results_out` gets the captions (rank 0, atomic).
    Warnings (a skipped metric) go to `warn` and into the result's "notes"."""
    import json
    import time

    from blip.atomic import write_json
    from blip.checkpoint import DEFAULT_CAPTIONER
    from blip.data.datasets import load_eval_set
    from blip.distributed import process_group
    from blip.eval.common import default_workers, load_for_eval

    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        if warn:
            warn(msg)

    def read_json(path: str, param: str) -> Any:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{param}: file not found: {p}", param=param)
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{param}: {p} is not valid JSON ({e})", param=param) from None

    settings = {"split": split, "meteor": meteor, "spice": spice}
    if results is not None:
        gt = read_json(annotations, "annotations") if annotations else None
        if gt is None:
            if dataset is None:
                raise InputError(
                    "results needs annotations GT.json (or a dataset whose ground truth to use)",
                    param=("results", "annotations", "dataset"),
                )
            gt = load_eval_set(dataset, split=split, data_root=data_root).gt
        res = read_json(results, "results")
        if not isinstance(res, list) or not all(isinstance(r, dict) and {"image_id", "caption"} <= set(r) for r in res):
            raise InputError(f'{results}: expected COCO results [{{"image_id": ..., "caption": ...}}, ...]')
        metrics = score_captions(res, gt, meteor=meteor, spice=spice, warn=note)
        return {
            **metrics,
            "model": None,
            "dataset": str(annotations) if annotations else dataset,
            "settings": {**settings, "results": str(results)},
            "stats": {"num_images": len({r["image_id"] for r in res})},
            "notes": notes,
        }

    if dataset is None:
        raise InputError(
            "give a dataset to caption, or results RESULTS.json with annotations GT.json to score",
            param=("dataset", "results", "annotations"),
        )
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}", param="batch_size")
    with process_group(device) as info:
        src = model or DEFAULT_CAPTIONER
        eval_set, loaded = load_for_eval(src, tokenizer, image_size, info.device, dataset, split, data_root, on_stage)
        t0 = time.perf_counter()
        metrics, captions = evaluate_caption(
            eval_set,
            loaded.model,
            loaded.tokenizer,
            prompt=prompt,
            num_beams=num_beams,
            max_length=max_length,
            min_length=min_length,
            batch_size=batch_size,
            num_workers=default_workers(num_workers, info.device),
            precision=precision,
            meteor=meteor,
            spice=spice,
            progress=progress,
            warn=note if info.is_main else None,
        )
        if info.is_main and results_out:
            write_json(results_out, captions, ensure_ascii=False)
        return {
            **metrics,
            "model": loaded.source,
            "dataset": eval_set.name,
            "settings": {
                **settings,
                "num_beams": num_beams,
                "max_length": max_length,
                "min_length": min_length,
                "prompt": prompt,
                "batch_size": batch_size,
                "image_size": loaded.model.config.vision.image_size,
                "world_size": info.world_size,
                "device": str(info.device),
                "precision": precision,
            },
            "stats": {"num_images": len(captions), "seconds": round(time.perf_counter() - t0, 2)},
            "notes": notes,
        }


from blip._callable import make_callable  # noqa: E402 - `blip.eval.caption(...)` calls run(...)

make_callable(__name__, "run")
