"""Training tasks: a model (+ momentum encoders) and its losses, as nn.Modules whose forward returns named losses.

One training loop (blip/train.py) serves all three; wrapping a task in DDP (broadcast_buffers=False, so the
feature queues are never overwritten) makes gradient sync work.

- PretrainTask: ITC (momentum + queue + distillation) + ITM (hard negatives) + LM, as BLIP_Pretrain.
- CaptionerTask: LM with the prompt tokens masked, as BLIP_Decoder.
- FilterTask: ITC with image-id positives + ITM with negatives outside the same image, as BLIP_Retrieval.

Speed: the original recomputes the image's cross-attention K/V for 4B image copies per step (ITM positives,
two negative sets, LM). Here each layer's K/V is computed once per image and shared: the positive pair and the
negative text of an image are two rows over the same K/V (`rows_per_kv=2`), the negative images index-select
it, and the decoder reuses it because its cross-attention modules *are* the encoder's (`shares_text`).

Shapes: B local batch, W world size, L text length, N image tokens (+1 for [CLS]), E ITC width, Q queue size.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from blip import distributed as D
from blip.data.swaps import WordSwapper
from blip.errors import InputError
from blip.losses import IGNORE, itc_loss, itm_loss, lm_labels, positive_mask, same_text, sample_hard_negatives
from blip.model.blip import BLIP, with_first_token
from blip.model.med import KV
from blip.model.momentum import Momentum

Batch = dict[str, torch.Tensor]


def _global_mean(mean: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """A rank's mean over its `count` items -> its share of the mean over the global batch's items.

    DDP averages the ranks' gradients, so each rank returns sum / global_count * W; under torchrun the loss then
    does not depend on how items (tokens, valid ITM rows) fall on the ranks. One process: `mean` unchanged.
    """
    _, world = D.rank_and_world()
    if world == 1:
        return mean
    total = D.all_reduce_sum(count.float())
    return mean * count * world / total.clamp(min=1)


class _Task(nn.Module):
    """Shared pieces; each task's forward reads top to bottom.

    Besides its losses a task owns what the training loop must not branch on: the model layout it trains
    (`layout`), whether it needs momentum encoders, how a loader batch becomes its batch (`prepare`), and the
    loss weights DDP must know about (`ddp_loss_weights`: a zero weight leaves parameters unused).
    """

    name = ""
    """The task's name in configs (`task`)."""
    command = ""
    """The CLI command that runs it."""
    layout = (True, True)
    """(text encoder, text decoder) of the model it trains and saves."""

    def __init__(self, model: BLIP, weights: dict[str, float], seed: int = 0):
        super().__init__()
        self.model = model
        self.weights = weights
        self.seed = seed

    @classmethod
    def needs_momentum(cls, loss: Any) -> bool:
        """Only ITC uses the momentum encoders and queues."""
        return loss.itc > 0

    @classmethod
    def ddp_loss_weights(cls, loss: Any) -> tuple[float, ...]:
        return (loss.itc, loss.itm, loss.lm)

    @classmethod
    def check_init(cls, src: Any, where: str) -> None:
        """`src` (a BlipConfig) can start this task."""

    def ids(self, raw: dict[str, Any], micro_step: int, rank: int, world: int) -> torch.Tensor:
        """ITC ids, unique per pair across ranks and steps: only the pair itself is a positive."""
        B = raw["image"].shape[0]
        gb = B * world
        return micro_step * gb + rank * B + torch.arange(B)

    def prepare(
        self, raw: dict[str, Any], tok: Any, data: Any, device: torch.device, micro_step: int, rank: int, world: int
    ) -> Batch:
        """Loader batch -> task batch: tokenise (`data.text_length`, `data.padding`), move to the device, ids."""
        ids, mask = tok(raw["caption"], max_length=data.text_length, padding=data.padding)
        idx = self.ids(raw, micro_step, rank, world)
        return {
            "image": raw["image"].to(device, non_blocking=True),
            "input_ids": ids.to(device, non_blocking=True),
            "attention_mask": mask.to(device, non_blocking=True),
            "idx": idx.to(device, non_blocking=True),
        }

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights.get(k.removesuffix("_loss"), 1.0) * v for k, v in parts.items() if k.endswith("_loss"))

    def lm(self, h: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        """Decoder hidden (B, L, D) + labels (B, L) -> mean next-token loss over the real tokens.

        Same value as `blip.losses.lm_loss`, but the LM head (D -> vocab) runs only on positions that have a
        target: padding is never projected onto the vocabulary. Under torchrun the mean is over the tokens of
        the global batch (`_global_mean`).
        """
        target = labels[:, 1:]  # (B, L-1)
        keep = target != IGNORE
        logits = self.model.text_decoder.logits(h[:, :-1][keep])  # (T, V), T real target tokens
        count = keep.sum()
        loss = nn.functional.cross_entropy(
            logits.float(), target[keep], label_smoothing=label_smoothing, reduction="sum"
        ) / count.clamp(min=1)  # (no tokens at all, e.g. prompt-only captions: 0, not NaN)
        return _global_mean(loss, count)

    def negative_generator(self, step: int, rank: int) -> torch.Generator:
        """Per-step generator for hard-negative sampling: the draw depends on (seed, step, rank) only, so a
        resumed run draws what the uninterrupted one did, and `rank=-1` gives every rank the same draw."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step * 7919 + rank + 1) % (2**63))


class _ContrastiveMatching(_Task):
    """ITC (momentum distillation, queues, id positives) + ITM (hard negatives): shared by pretrain and filter."""

    def __init__(
        self,
        model: BLIP,
        momentum: Momentum | None,
        weights: dict[str, float],
        negatives_all_ranks: bool = False,
        seed: int = 0,
        hardness: float = 1.0,
        word_swaps: Sequence[Sequence[str]] = (),
    ):
        super().__init__(model, weights, seed)
        self.momentum = momentum
        self.negatives_all_ranks = negatives_all_ranks
        self.hardness = hardness
        """ITM negatives ~ softmax(hardness * ITC similarity): 1 as the original, 0 uniform."""
        self.swapper = WordSwapper(word_swaps, key="loss.word_swaps") if word_swaps else None
        """One more ITM negative per pair: the caption with one word swapped (`loss.word_swaps`)."""

    def prepare(
        self, raw: dict[str, Any], tok: Any, data: Any, device: torch.device, micro_step: int, rank: int, world: int
    ) -> Batch:
        """With word swaps, also `swap_ids`/`swap_mask` (tokenised with the captions: one length) and `swap_ok`
        (False where a caption has no word to swap)."""
        batch = super().prepare(raw, tok, data, device, micro_step, rank, world)
        if self.swapper is None:
            return batch
        captions = list(raw["caption"])
        # drawn per sample and step: a resumed run, or one with another number of ranks, swaps the same words
        swapped = [
            self.swapper(c, random.Random(f"{self.seed}/{micro_step}/{k}"))
            for c, k in zip(captions, raw["key"], strict=True)
        ]
        ids, mask = tok(
            captions + [s or c for s, c in zip(swapped, captions, strict=True)],
            max_length=data.text_length,
            padding=data.padding,
        )
        B = len(captions)  # ids: (2B, L), the captions then their swaps
        batch["input_ids"], batch["attention_mask"] = ids[:B].to(device), mask[:B].to(device)
        batch["swap_ids"], batch["swap_mask"] = ids[B:].to(device), mask[B:].to(device)
        batch["swap_ok"] = torch.tensor([s is not None for s in swapped], device=device)
        return batch

    @staticmethod
    def swaps(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        return (batch["swap_ids"], batch["swap_mask"], batch["swap_ok"]) if "swap_ids" in batch else None

    def itc_and_itm(
        self,
        image: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        idx: torch.Tensor,
        image_embeds: torch.Tensor,
        image_kv: list[KV],
        alpha: float,
        step: int,
        update_momentum: bool,
        swaps: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        m = self.model
        rank, world = D.rank_and_world()
        B = ids.shape[0]
        out: dict[str, torch.Tensor] = {}
        use_itc = self.weights.get("itc", 1.0) > 0
        if use_itc and self.momentum is None:
            raise ValueError("ITC needs the momentum encoders and queues (a Momentum module)")

        # ---- ITC: online features vs [momentum features of the global batch; queue] ---------------------------
        image_feat = m.image_features(image_embeds).float()  # (B, E)
        with torch.no_grad():
            if use_itc:
                if update_momentum:
                    self.momentum.update(m)
                img_m, txt_m = (t.float() for t in self.momentum.features(image, ids, mask))  # (B, E) each
                img_m_world, txt_m_world = D.gather_no_grad(img_m), D.gather_no_grad(txt_m)  # (W*B, E)
            idx_world = D.gather_no_grad(idx)  # (W*B,)
        if use_itc:
            text_feat = m.text_features(ids, mask).float()  # (B, E)
            q = self.momentum
            img_all = torch.cat([img_m_world, q.image_queue.float()])  # (W*B + Q, E)
            txt_all = torch.cat([txt_m_world, q.text_queue.float()])
            idx_all = torch.cat([idx_world, q.idx_queue])
            valid = torch.cat([torch.ones_like(idx_world, dtype=torch.bool), q.filled()])
            itc = itc_loss(image_feat, text_feat, img_all, txt_all, idx, idx_all, m.temp, img_m, txt_m, alpha, valid)
            out["itc_loss"] = itc["itc_loss"]
            q.enqueue(img_m_world, txt_m_world, idx_world)

        # ---- ITM hard negatives: one negative image per text, one negative text per image -----------------------
        if self.weights.get("itm", 1.0) <= 0:
            return out
        if self.negatives_all_ranks:  # captions are gathered across ranks: one length for all
            ids, mask = D.pad_to_longest_across_ranks(ids, mask, m.config.pad_token_id)
        with torch.no_grad():
            if self.negatives_all_ranks:
                # every rank samples for the whole global batch with the same generator, then keeps its rows:
                # identical to one process running the global batch
                if use_itc:
                    text_feat_d = text_feat.detach()
                else:
                    text_feat_d = m.text_features(ids, mask).float()
                img_w, txt_w = D.gather_no_grad(image_feat.detach()), D.gather_no_grad(text_feat_d)  # (W*B, E)
                sim_i2t = img_w @ txt_w.T / m.temp  # (W*B, W*B)
                ids_w = D.gather_no_grad(ids)  # (W*B, L)
                pos = positive_mask(idx_world, idx_world) | same_text(ids_w, ids_w)
                g = self.negative_generator(step, -1)
                neg_img, ok_img = sample_hard_negatives(sim_i2t.T, pos, g, self.hardness)  # per text: an image index
                neg_txt, ok_txt = sample_hard_negatives(sim_i2t, pos, g, self.hardness)  # per image: a text index
                rows = slice(rank * B, (rank + 1) * B)
                neg_img, ok_img, neg_txt, ok_txt = neg_img[rows], ok_img[rows], neg_txt[rows], ok_txt[rows]
            else:
                # in-batch on the local rank, as BLIP_Pretrain: columns of this rank's momentum batch
                if use_itc:
                    cols = slice(rank * B, (rank + 1) * B)
                    sim_i2t, sim_t2i = itc["sim_i2t"][:, cols], itc["sim_t2i"][:, cols]  # (B, B)
                else:
                    sim_i2t = image_feat.detach() @ m.text_features(ids, mask).float().T / m.temp
                    sim_t2i = sim_i2t.T
                pos = positive_mask(idx, idx) | same_text(ids, ids)
                g = self.negative_generator(step, rank)
                neg_img, ok_img = sample_hard_negatives(sim_t2i, pos, g, self.hardness)
                neg_txt, ok_txt = sample_hard_negatives(sim_i2t, pos, g, self.hardness)

        if self.negatives_all_ranks and world > 1:
            ids_world, mask_world = ids_w, D.gather_no_grad(mask)
            neg_ids, neg_mask = ids_world[neg_txt], mask_world[neg_txt]
            embeds_world = D.gather_with_grad(image_embeds)  # (W*B, 1+N, Dv), gradients flow to their rank
            neg_kv = m.text_encoder.image_kv(embeds_world[neg_img])
        else:
            neg_ids, neg_mask = ids[neg_txt], mask[neg_txt]
            neg_kv = [(k[neg_img], v[neg_img]) for k, v in image_kv]  # (B, H, 1+N, d) per layer

        # image i's positive text, its negative text (and its swapped text) are R rows over image i's K/V
        L = ids.shape[1]
        rows, row_masks = [ids, neg_ids], [mask, neg_mask]
        if swaps is not None:  # tokenised with the local captions: pad to L if they were padded across ranks
            swap_ids, swap_mask, swap_ok = swaps
            rows.append(nn.functional.pad(swap_ids, (0, L - swap_ids.shape[1]), value=m.config.pad_token_id))
            row_masks.append(nn.functional.pad(swap_mask, (0, L - swap_mask.shape[1]), value=0))
        R = len(rows)
        pair_ids = torch.stack(rows, 1).view(R * B, L)  # (R*B, L), image-major
        pair_mask = torch.stack(row_masks, 1).view(R * B, L)
        logits_pn = m.itm_logits(pair_ids, pair_mask, image_kv=image_kv, rows_per_kv=R).view(B, R, 2)
        logits_ni = m.itm_logits(ids, mask, image_kv=neg_kv)  # (B, 2): text i with its negative image
        logits = torch.cat([logits_pn[:, 0], logits_pn[:, 1], logits_ni, *logits_pn[:, 2:].unbind(1)])  # (3B [+B], 2)
        ones = torch.ones(B, dtype=torch.long, device=ids.device)
        zeros_t = torch.where(ok_txt.to(ids.device), 0, IGNORE)
        zeros_i = torch.where(ok_img.to(ids.device), 0, IGNORE)
        labels = torch.cat([ones, zeros_t, zeros_i] + ([torch.where(swap_ok, 0, IGNORE)] if swaps is not None else []))
        itm = itm_loss(logits, labels)
        out["itm_loss"] = _global_mean(itm["itm_loss"], (labels != IGNORE).sum())  # rows without negatives vary
        out["itm_acc"] = itm["itm_acc"]
        return out


class PretrainTask(_ContrastiveMatching):
    """ITC + ITM + LM on noisy web pairs. Batch: image, input_ids, attention_mask, idx (unique per sample)."""

    name, command, layout = "pretrain", "pretrain", (True, True)

    @classmethod
    def from_config(cls, model: BLIP, momentum: Momentum | None, cfg: Any, tok: Any) -> PretrainTask:
        c = cfg.loss
        weights = {"itc": c.itc, "itm": c.itm, "lm": c.lm}
        return cls(
            model,
            momentum,
            weights,
            c.negatives_all_ranks,
            c.label_smoothing,
            cfg.train.seed,
            c.hard_negatives,
            c.word_swaps,
        )

    def __init__(
        self,
        model: BLIP,
        momentum: Momentum | None,
        weights: dict[str, float],
        negatives_all_ranks: bool = False,
        label_smoothing: float = 0.1,
        seed: int = 0,
        hardness: float = 1.0,
        word_swaps: Sequence[Sequence[str]] = (),
    ):
        if not (model.config.text_encoder and model.config.text_decoder):
            raise ValueError("pre-training needs a model with both a text encoder and a text decoder")
        super().__init__(model, momentum, weights, negatives_all_ranks, seed, hardness, word_swaps)
        self.label_smoothing = label_smoothing

    def forward(self, batch: Batch, alpha: float = 0.0, step: int = 0, update_momentum: bool = True) -> Batch:
        m = self.model
        image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            m.temp.clamp_(0.001, 0.5)
        image_embeds = m.encode_image(image)  # (B, 1+N, Dv)
        image_kv = m.text_encoder.image_kv(image_embeds)  # per layer (B, H, 1+N, d): once per image
        out = self.itc_and_itm(
            image, ids, mask, batch["idx"], image_embeds, image_kv, alpha, step, update_momentum, self.swaps(batch)
        )
        if self.weights.get("lm", 1.0) > 0:
            dec_kv = image_kv if m.shares_text else m.text_decoder.bert.image_kv(image_embeds)
            h = m.text_decoder.bert(with_first_token(ids, m.config.bos_token_id), mask, image_kv=dec_kv)
            out["lm_loss"] = self.lm(h, lm_labels(ids, mask), self.label_smoothing)
        out["loss"] = self.total(out)
        return out


class FilterTask(_ContrastiveMatching):
    """ITC + ITM fine-tune (the CapFilt filter). Batch: image, input_ids, attention_mask, idx (image ids), so
    every caption of the same image is an ITC positive and never an ITM negative."""

    name, command, layout = "filter", "finetune-filter", (True, False)

    @classmethod
    def from_config(cls, model: BLIP, momentum: Momentum | None, cfg: Any, tok: Any) -> FilterTask:
        c = cfg.loss
        weights = {"itc": c.itc, "itm": c.itm, "lm": c.lm}
        return cls(model, momentum, weights, c.negatives_all_ranks, cfg.train.seed, c.hard_negatives, c.word_swaps)

    @classmethod
    def ddp_loss_weights(cls, loss: Any) -> tuple[float, ...]:
        return (loss.itc, loss.itm)

    @classmethod
    def check_init(cls, src: Any, where: str) -> None:
        if not src.text_encoder:
            raise InputError(f"model.init {where}: the filter needs a model with a text encoder", param="model.init")

    def ids(self, raw: dict[str, Any], micro_step: int, rank: int, world: int) -> torch.Tensor:
        return torch.as_tensor(raw["image_id"], dtype=torch.long)  # captions of one image are positives

    def __init__(
        self,
        model: BLIP,
        momentum: Momentum | None,
        weights: dict[str, float],
        negatives_all_ranks: bool = True,
        seed: int = 0,
        hardness: float = 1.0,
        word_swaps: Sequence[Sequence[str]] = (),
    ):
        if not model.config.text_encoder:
            raise ValueError("the filter needs a model with a text encoder")
        super().__init__(model, momentum, weights, negatives_all_ranks, seed, hardness, word_swaps)

    def forward(self, batch: Batch, alpha: float = 0.0, step: int = 0, update_momentum: bool = True) -> Batch:
        m = self.model
        image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            m.temp.clamp_(0.001, 0.5)
        image_embeds = m.encode_image(image)  # (B, 1+N, Dv)
        image_kv = m.text_encoder.image_kv(image_embeds)
        out = self.itc_and_itm(
            image, ids, mask, batch["idx"], image_embeds, image_kv, alpha, step, update_momentum, self.swaps(batch)
        )
        out["loss"] = self.total(out)
        return out


class CaptionerTask(_Task):
    """LM fine-tune (the CapFilt captioner). Batch: image, input_ids, attention_mask of prompt + caption."""

    name, command, layout = "captioner", "finetune-captioner", (False, True)

    @classmethod
    def from_config(cls, model: BLIP, momentum: Momentum | None, cfg: Any, tok: Any) -> CaptionerTask:
        prompt_length = len(tok.encode_prompt(cfg.data.prompt)) if cfg.data.prompt else 0
        return cls(model, prompt_length, cfg.loss.label_smoothing, cfg.train.seed)

    @classmethod
    def needs_momentum(cls, loss: Any) -> bool:
        return False

    @classmethod
    def ddp_loss_weights(cls, loss: Any) -> tuple[float, ...]:
        return (loss.lm,)

    @classmethod
    def check_init(cls, src: Any, where: str) -> None:
        if not src.text_decoder:
            raise InputError(f"model.init {where}: the captioner needs a model with a text decoder", param="model.init")

    def __init__(self, model: BLIP, prompt_length: int, label_smoothing: float = 0.1, seed: int = 0):
        if not model.config.text_decoder:
            raise ValueError("the captioner needs a model with a text decoder")
        super().__init__(model, {"lm": 1.0}, seed)
        self.prompt_length = prompt_length
        self.label_smoothing = label_smoothing

    def forward(self, batch: Batch, alpha: float = 0.0, step: int = 0, update_momentum: bool = True) -> Batch:
        m = self.model
        ids, mask = batch["input_ids"], batch["attention_mask"]
        image_embeds = m.encode_image(batch["image"])  # (B, 1+N, Dv)
        h = m.text_decoder.bert(with_first_token(ids, m.config.bos_token_id), mask, image_embeds=image_embeds)
        out = {"lm_loss": self.lm(h, lm_labels(ids, mask, self.prompt_length), self.label_smoothing)}
        out["loss"] = self.total(out)
        return out


TASKS: dict[str, type[_Task]] = {t.name: t for t in (PretrainTask, CaptionerTask, FilterTask)}
"""Config `task` -> its class."""
