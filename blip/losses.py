"""BLIP's three losses as pure functions returning named dicts (the total is the sum of the `*_loss` keys).

- ITC: contrastive over [momentum features of the batch; feature queue], learnable temperature, momentum
  distillation (soft targets from the momentum model, mixed with weight alpha), multi-positive by id.
- ITM: binary match/no-match on [ENC], with one hard negative per example sampled by ITC similarity.
- LM: next-token cross-entropy with label smoothing 0.1, prompt and padding masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
_EXCLUDED = -1e4
"""Logit of an excluded ITC candidate: far below any real one (|sim| <= 1 / temp <= 1000), finite so that
0 * log_softmax stays 0."""


def positive_mask(idx: torch.Tensor, idx_all: torch.Tensor) -> torch.Tensor:
    """(B,), (C,) ids -> (B, C) bool: candidate c is a positive of row b when the ids match.

    Pre-training passes unique per-sample ids (only the pair itself is positive; queue ids are -1); the filter
    fine-tune passes image ids, so every caption of the same image is a positive.
    """
    return idx[:, None] == idx_all[None, :]


def same_text(ids: torch.Tensor, ids_all: torch.Tensor) -> torch.Tensor:
    """(B, L), (C, L) padded token ids -> (B, C) bool: the two captions are word for word the same.

    Such a pair is no ITM negative (the caption of one is as true of the other image): with hard negatives they
    would be the first drawn, teaching the filter to reject correct captions.
    """
    return (ids[:, None, :] == ids_all[None, :, :]).all(-1)


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_all: torch.Tensor,
    text_feat_all: torch.Tensor,
    idx: torch.Tensor,
    idx_all: torch.Tensor,
    temp: torch.Tensor,
    image_feat_m: torch.Tensor | None = None,
    text_feat_m: torch.Tensor | None = None,
    alpha: float = 0.0,
    valid: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Image-text contrastive loss.

    image_feat, text_feat: (B, E) unit-norm features of the online model (with gradient).
    image_feat_all, text_feat_all: (C, E) candidate columns: momentum (or online) features of the (gathered)
        batch followed by the queue.
    idx, idx_all: (B,), (C,) ids that define the positives (see `positive_mask`).
    image_feat_m, text_feat_m: (B, E) momentum features of this batch; with alpha > 0 they give the soft
        distillation targets.
    valid: (C,) bool, False for queue slots not filled yet: left out of the softmax. The original fills the
        queue with random vectors and keeps them as negatives; from scratch (no pre-trained towers) those make the
        cheapest first move collapsing both towers onto one direction, which the queue then preserves.
    """
    sim_i2t = image_feat @ text_feat_all.T / temp  # (B, C)
    sim_t2i = text_feat @ image_feat_all.T / temp  # (B, C)
    if valid is not None:
        sim_i2t = sim_i2t.masked_fill(~valid, _EXCLUDED)
        sim_t2i = sim_t2i.masked_fill(~valid, _EXCLUDED)
    pos = positive_mask(idx, idx_all).float()
    targets = pos / pos.sum(1, keepdim=True).clamp(min=1.0)
    t_i2t = t_t2i = targets
    if alpha > 0:
        if image_feat_m is None or text_feat_m is None:
            raise ValueError("momentum distillation (alpha > 0) needs image_feat_m and text_feat_m")
        with torch.no_grad():
            m_i2t = image_feat_m @ text_feat_all.T / temp
            m_t2i = text_feat_m @ image_feat_all.T / temp
            if valid is not None:
                m_i2t, m_t2i = m_i2t.masked_fill(~valid, _EXCLUDED), m_t2i.masked_fill(~valid, _EXCLUDED)
            t_i2t = alpha * m_i2t.softmax(1) + (1 - alpha) * targets
            t_t2i = alpha * m_t2i.softmax(1) + (1 - alpha) * targets
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * t_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t_t2i).sum(1).mean()
    return {"itc_loss": (loss_i2t + loss_t2i) / 2, "sim_i2t": sim_i2t.detach(), "sim_t2i": sim_t2i.detach()}


def sample_hard_negatives(
    sim: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None, hardness: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one negative column per row with probability softmax(hardness * sim) over the non-positive columns.

    hardness 1 is the original; 0 draws negatives uniformly (easier ones: ITM learns from scratch on a world
    full of near-duplicate scenes, where the hardest "negatives" are often true matches).
    sim: (B, C) similarity logits (already divided by the temperature); positives: (B, C) bool.
    Returns (index (B,), valid (B,) bool). Uses the Gumbel-max trick instead of torch.multinomial: it never
    picks a positive, never raises "invalid multinomial distribution" (NaN/inf/all-equal rows are fine), and a
    row without any negative (e.g. every caption in the batch is of the same image) comes back `valid=False`.
    """
    s = torch.nan_to_num(sim.detach().float(), nan=0.0, posinf=1e4, neginf=-1e4).clamp(-1e4, 1e4) * hardness
    u = torch.rand(s.shape, generator=generator, device=s.device if generator is None else generator.device)
    gumbel = -torch.log(-torch.log(u.to(s.device).clamp(1e-20, 1.0 - 1e-7)))
    scores = (s + gumbel).masked_fill(positives, -float("inf"))
    index = scores.argmax(1)
    valid = ~positives.all(1)
    return index, valid


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, 2) ITM logits, (N,) labels in {1 match, 0 no match, -100 ignore} -> mean cross-entropy."""
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
    acc = ((logits.argmax(1) == labels).float().sum() / (labels != IGNORE).sum().clamp(min=1)).detach()
    return {"itm_loss": loss, "itm_acc": acc}


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int = 0) -> torch.Tensor:
    """Targets for the decoder: padding and the first `prompt_length` tokens ([DEC] + prompt) ignored."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    labels[:, :prompt_length] = IGNORE
    return labels


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> dict[str, torch.Tensor]:
    """(B, L, V) logits, (B, L) labels (from `lm_labels`) -> next-token cross-entropy, mean over real tokens."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(L-1), V)
    target = labels[:, 1:].reshape(-1)
    return {"lm_loss": F.cross_entropy(shifted, target, ignore_index=IGNORE, label_smoothing=label_smoothing)}


def total_loss(parts: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> torch.Tensor:
    """Weighted sum of the `*_loss` entries (default weight 1 each)."""
    weights = weights or {}
    return sum(weights.get(k, 1.0) * v for k, v in parts.items() if k.endswith("_loss"))
