"""Image-text retrieval evaluation as in the paper: ITC for all pairs, ITM + ITC re-ranking of the top-k, recall@K.

The scores are the original's (train_retrieval.py `evaluation`): for each image its top-k texts by ITC cosine,
for each text its top-k images, each candidate pair scored as ITM match logit (logit[:, 1], no softmax) + ITC
cosine, every other entry -100; the metrics are the original `itm_eval`, ties included. `k=0` ranks every pair by
the ITC cosine alone (no ITM): the score of a model whose ITM head is untrained, e.g. a short pre-training (measured on
the laptop demo: its pre-trainings' ITM logits, of a head at chance or barely above, swamp the cosines they re-rank).

It is much faster than the original and its memory is bounded, for the same numbers:
- the cross-attention K/V of an image are computed once and shared by all its candidate texts (query folding,
  see blip.model.med); the original recomputes them for each of the k pairs, and for ViT-B at 384 px projecting
  577 image tokens costs more than running the 35 text tokens through the layer;
- all work is grouped by image: a pair that is a candidate in both directions is scored once, and t2i needs no
  (k, N, D) copy of image tokens per text;
- each forward is cut to the longest text in it;
- images are processed in chunks, so only one group's K/V live at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from blip.distributed import broadcast_from_main, my_batches, rank_and_world, sum_
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

METRIC_KEYS = (
    "txt_r1",
    "txt_r5",
    "txt_r10",
    "txt_r_mean",
    "img_r1",
    "img_r5",
    "img_r10",
    "img_r_mean",
    "r_mean",
)
NOT_A_CANDIDATE = -100.0
IMAGES_PER_CHUNK = 4
"""Unit of work sharded over ranks; fixed, so results do not depend on the number of processes."""


# ---- metrics -----------------------------------------------------------------------------------------------------
def recall_metrics(
    score_i2t: np.ndarray | torch.Tensor,
    score_t2i: np.ndarray | torch.Tensor,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
) -> dict[str, float]:
    """Recall@1/5/10 in percent, exactly the original `itm_eval` (same numpy argsort, so the same tie order).

    score_i2t: (N_img, N_txt); score_t2i: (N_txt, N_img). A text counts as retrieved for an image at the best
    rank of any of the image's ground-truth texts; an image with no ground truth counts as a miss.
    """
    score_i2t, score_t2i = _numpy(score_i2t), _numpy(score_t2i)
    if len(img2txt) != score_i2t.shape[0] or len(txt2img) != score_t2i.shape[0]:
        raise ValueError("img2txt/txt2img lengths must match the score matrices' rows")

    ranks = np.zeros(score_i2t.shape[0])
    for index, score in enumerate(score_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr1, tr5, tr10 = (100.0 * len(np.where(ranks < n)[0]) / len(ranks) for n in (1, 5, 10))

    ranks = np.zeros(score_t2i.shape[0])
    for index, score in enumerate(score_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1, ir5, ir10 = (100.0 * len(np.where(ranks < n)[0]) / len(ranks) for n in (1, 5, 10))

    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    values = (tr1, tr5, tr10, tr_mean, ir1, ir5, ir10, ir_mean, (tr_mean + ir_mean) / 2)
    return {k: float(v) for k, v in zip(METRIC_KEYS, values, strict=True)}


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ---- scores ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def retrieval_scores(
    model: BLIP,
    tokenizer: Tokenizer,
    images: ImagesLike,
    texts: Sequence[str],
    k: int = 256,
    *,
    image_batch_size: int = 32,
    text_batch_size: int = 256,
    pairs_per_batch: int = 512,
    max_length: int = 35,
    precision: str = "fp32",
    num_workers: int = 0,
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(score_i2t (N_img, N_txt), score_t2i (N_txt, N_img)) float32, as the original's score matrices.

    images: a (N, 3, H, W) tensor or a dataset of (3, H, W) tensors (already transformed).
    k: ITC candidates per image and per text re-ranked by ITM + ITC; 0: ITC cosine for every pair, no ITM.
    pairs_per_batch: (image, text) pairs per ITM forward. precision: auto, fp32 or bf16 (blip.precision).
    progress: called with stages "images", "texts", "pairs" and this rank's totals.
    Under torch.distributed every rank returns the full matrices; each rank scored a share of the images.
    """
    if not model.config.text_encoder:
        raise InputError("this model has no text encoder (ITC/ITM): it is a captioner, not a retrieval model")
    if k < 0:
        raise InputError(f"k must be at least 0 (0: ITC only, no ITM re-ranking), got {k}", param="k")
    dev = model_device(model)
    rank, world = rank_and_world()
    report = progress or (lambda stage, n, total: None)

    dtype = resolve(precision, dev)

    def amp():
        return autocast(dev, dtype)

    ids, mask = tokenizer(list(texts), max_length=max_length)  # (T, L), padded to the longest text
    ids, mask = ids.to(dev), mask.to(dev)
    store = dtype  # under autocast the image tokens come out of the ViT in bf16 anyway
    keep = k > 0  # the ITM re-ranking needs the image tokens; ITC alone only the features
    img_tokens, img_feat = _encode_images(model, images, image_batch_size, num_workers, amp, store, report, keep)
    txt_feat = _encode_texts(model, ids, mask, text_batch_size, amp, report)
    sims = img_feat @ txt_feat.t()  # (N, T) ITC cosine
    if k == 0:
        return sims.cpu().numpy(), sims.t().cpu().numpy()
    N, T = sims.shape

    # candidates: each image's top-k texts (i2t) and each text's top-k images (t2i)
    top_i2t = sims.topk(min(k, T), dim=1).indices  # (N, k)
    top_t2i = sims.t().topk(min(k, N), dim=1).indices  # (T, k)
    cand_i2t = torch.zeros(N, T, dtype=torch.bool, device=dev).scatter_(1, top_i2t, True)
    cand_t2i = torch.zeros(T, N, dtype=torch.bool, device=dev).scatter_(1, top_t2i, True)
    del top_i2t, top_t2i
    pairs = cand_i2t | cand_t2i.t()  # (N, T) every pair to score once, whichever direction needs it

    # ITM + ITC for every candidate pair, grouped by image; zero where this rank scored nothing
    pair_scores = torch.zeros(N, T, device=dev)
    per_image = pairs.sum(1).tolist()
    chunk = max(IMAGES_PER_CHUNK, pairs_per_batch // max(1, min(k, T)))
    chunks = my_batches(N, chunk, rank, world)
    total = sum(per_image[i] for c in chunks for i in c)
    report("pairs", 0, total)
    for c in chunks:
        for group, R in _groups(c, per_image, pairs_per_batch):
            with amp():  # the stored tokens are bf16 under bf16: project them under autocast too
                kv = model.text_encoder.image_kv(img_tokens[group])  # per layer (n, H, N_tok, d), once per image
            t_idx, valid = _rows(pairs, group, R)  # (n, R) text indices, image-major
            logits = torch.empty(t_idx.shape, device=dev)
            step = max(1, pairs_per_batch // len(group))  # < R only for a lone image with very many candidates
            for s in range(0, R, step):
                logits[:, s : s + step] = _itm(model, kv, t_idx[:, s : s + step], ids, mask, amp)
            i_idx = torch.tensor(group, device=dev)[:, None].expand_as(t_idx)  # (n, R)
            i_idx, t_idx = i_idx[valid], t_idx[valid]
            pair_scores[i_idx, t_idx] = logits[valid] + sims[i_idx, t_idx]
            report("pairs", int(valid.sum()), total)
    sum_(pair_scores)

    score_i2t = torch.where(cand_i2t, pair_scores, NOT_A_CANDIDATE)
    score_t2i = torch.where(cand_t2i, pair_scores.t(), NOT_A_CANDIDATE)
    return score_i2t.cpu().numpy(), score_t2i.cpu().numpy()


def _encode_images(model, images, batch_size, num_workers, amp, store, report, keep_tokens=True):
    """ViT tokens (N, 1 + P, Dv; None unless `keep_tokens`) and ITC features (N, E) of every image, kept on the
    model's device."""
    dev = model_device(model)
    rank, world = rank_and_world()
    N = len(images)
    if N == 0:
        raise InputError("no images to evaluate")
    n_tok = model.visual_encoder.pos_embed.shape[1]
    tokens = torch.zeros(N, n_tok, model.config.vision.width, dtype=store, device=dev) if keep_tokens else None
    feats = torch.zeros(N, model.config.embed_dim, device=dev)
    mine = sum(len(r) for r in my_batches(N, batch_size, rank, world))
    report("images", 0, mine)
    for r, px in image_batches(images, batch_size, rank, world, num_workers):
        with amp():
            emb = model.encode_image(px.to(dev))  # (B, 1 + P, Dv)
            feat = model.image_features(emb)
        if tokens is not None:
            tokens[r.start : r.stop] = emb.to(store)
        feats[r.start : r.stop] = feat.float()
        report("images", len(r), mine)
    return (sum_(tokens) if tokens is not None else None), sum_(feats)


def _encode_texts(model, ids, mask, batch_size, amp, report):
    """ITC features (T, E) of every text ([CLS] first, unimodal encoder)."""
    rank, world = rank_and_world()
    T = ids.shape[0]
    if T == 0:
        raise InputError("no texts to evaluate")
    feats = torch.zeros(T, model.config.embed_dim, device=ids.device)
    batches = my_batches(T, batch_size, rank, world)
    mine = sum(len(r) for r in batches)
    report("texts", 0, mine)
    for r in batches:
        with amp():
            feats[r.start : r.stop] = model.text_features(*_trim(ids[r.start : r.stop], mask[r.start : r.stop])).float()
        report("texts", len(r), mine)
    return sum_(feats)


def _groups(chunk: range, per_image: list[int], pairs_per_batch: int) -> list[tuple[list[int], int]]:
    """Split a chunk of images into forward groups of n images x R rows (R = the group's largest row count).

    Images are sorted by their number of candidate texts, so padding rows (to a common R) are few.
    """
    order = sorted(chunk, key=lambda i: (-per_image[i], i))
    groups: list[tuple[list[int], int]] = []
    for i in order:
        if per_image[i] == 0:
            continue
        if groups and (len(groups[-1][0]) + 1) * groups[-1][1] <= pairs_per_batch:
            groups[-1][0].append(i)
        else:
            groups.append(([i], per_image[i]))
    return groups


def _rows(pairs: torch.Tensor, group: list[int], R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate text indices of each image in the group, padded to R by repeating its first one: (n, R) x2."""
    t_idx = torch.empty(len(group), R, dtype=torch.long, device=pairs.device)
    valid = torch.zeros(len(group), R, dtype=torch.bool, device=pairs.device)
    for j, i in enumerate(group):
        cand = pairs[i].nonzero().squeeze(1)
        t_idx[j] = cand[0]
        t_idx[j, : len(cand)] = cand
        valid[j, : len(cand)] = True
    return t_idx, valid


def _itm(model, kv, t_idx, ids, mask, amp) -> torch.Tensor:
    """ITM match logits (n, R) of R texts against each of n images whose cross-attention K/V are `kv`."""
    n, R = t_idx.shape
    flat = t_idx.reshape(-1)  # (n*R,) image-major: rows [b*R:(b+1)*R] belong to image b
    with amp():
        logits = model.itm_logits(*_trim(ids[flat], mask[flat]), image_kv=kv, rows_per_kv=R)  # (n*R, 2)
    return logits[:, 1].float().view(n, R)


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut (B, L) right-padded ids/mask to the longest text in the batch."""
    L = int(mask.sum(1).max())
    return ids[:, :L], mask[:, :L]


# ---- the whole evaluation ----------------------------------------------------------------------------------------
def evaluate_retrieval(
    eval_set,
    model: BLIP,
    tokenizer: Tokenizer,
    k: int = 256,
    *,
    image_batch_size: int = 32,
    text_batch_size: int = 256,
    pairs_per_batch: int = 512,
    precision: str = "fp32",
    num_workers: int = 0,
    progress: ProgressFn | None = None,
) -> dict[str, float]:
    """Retrieval recall (percent) of `model` on an EvalSet (blip.data.datasets.load_eval_set); same on every rank."""
    from blip.data.transforms import eval_transform

    images = PixelDataset(eval_set, eval_transform(model.config.vision.image_size))
    score_i2t, score_t2i = retrieval_scores(
        model,
        tokenizer,
        images,
        eval_set.texts,
        k,
        image_batch_size=image_batch_size,
        text_batch_size=text_batch_size,
        pairs_per_batch=pairs_per_batch,
        precision=precision,
        num_workers=num_workers,
        progress=progress,
    )
    rank, _ = rank_and_world()
    metrics = recall_metrics(score_i2t, score_t2i, eval_set.img2txt, eval_set.txt2img) if rank == 0 else None
    return broadcast_from_main(metrics)


# ---- the verb: `blip.eval.retrieval(...)`, what `blipctl eval-retrieval` runs --------------------------------
def run(
    dataset: str,
    model: Any = None,
    *,
    k: int = 256,
    split: str = "test",
    data_root: str | None = None,
    batch_size: int = 512,
    tokenizer: str | None = None,
    image_size: int | None = None,
    device: str = "auto",
    num_workers: int | None = None,
    precision: str = "fp32",
    progress: ProgressFn | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Retrieval recall (R@1/5/10, percent) of `model` on `dataset` (coco, flickr30k, a shard spec or an
    annotation JSON), as the paper: ITC top-k re-ranked by ITM + ITC (`k=0`: ITC only). Under torchrun every rank
    computes a share; every rank returns the result. `model`: a source (default Salesforce/blip-itm-base-coco) or a
    loaded model."""
    import time

    from blip.checkpoint import DEFAULT_FILTER
    from blip.distributed import process_group
    from blip.eval.common import default_workers, load_for_eval

    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}", param="batch_size")
    with process_group(device) as info:
        src = model or DEFAULT_FILTER
        eval_set, loaded = load_for_eval(src, tokenizer, image_size, info.device, dataset, split, data_root, on_stage)
        t0 = time.perf_counter()
        metrics = evaluate_retrieval(
            eval_set,
            loaded.model,
            loaded.tokenizer,
            k,
            image_batch_size=min(32, batch_size),
            text_batch_size=min(256, batch_size),
            pairs_per_batch=batch_size,
            num_workers=default_workers(num_workers, info.device),
            precision=precision,
            progress=progress,
        )
        return {
            **metrics,
            "model": loaded.source,
            "dataset": eval_set.name,
            "settings": {
                "k": k,
                "split": split,
                "batch_size": batch_size,
                "image_size": loaded.model.config.vision.image_size,
                "world_size": info.world_size,
                "device": str(info.device),
                "precision": precision,
            },
            "stats": {
                "num_images": len(eval_set.img2txt),
                "num_texts": len(eval_set.txt2img),
                "seconds": round(time.perf_counter() - t0, 2),
            },
        }


from blip._callable import make_callable  # noqa: E402 - `blip.eval.retrieval(...)` calls run(...)

make_callable(__name__, "run")
