"""Caption generation: greedy, beam search and nucleus sampling over the BLIP decoder, with caches.

Speed comes from two caches: each layer's self-attention K/V grows by one token per step (no re-encoding of
the prefix), and each layer's cross-attention K/V of the image is computed once per image and shared by all
of that image's rows (beams or sampled captions) through query folding (see blip.model.med).

Beam search follows transformers' `generate` exactly (same candidate pool of 2*num_beams, the same length
penalty on finished hypotheses, the same early-stop heuristic with `early_stopping=False`), so captions are
token-identical to transformers' on the same weights. Lengths count the prompt tokens, as the original does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blip.errors import InputError
from blip.model.blip import BLIP

NEG = -1.0e9


@dataclass
class GenerationConfig:
    num_beams: int = 3
    max_length: int = 20
    """Total length including [DEC] and the prompt tokens (the original and transformers count them)."""
    min_length: int = 5
    do_sample: bool = False
    top_p: float = 0.9
    top_k: int = 0
    """0 disables top-k filtering when sampling."""
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    num_return_sequences: int = 1
    """Captions per image: sampled independently, or the best beams."""

    def __post_init__(self) -> None:
        """Refuse values that crash or silently mean something else (top_p 0 sampled NaNs; top_p 2 acted as 1)."""
        check_range("num_beams", self.num_beams, low=1)
        check_range("max_length", self.max_length, low=1)
        check_range("min_length", self.min_length, low=0)
        if self.min_length > self.max_length:
            raise InputError(f"min_length: must not exceed max_length ({self.max_length}), got {self.min_length}")
        check_range("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_range("top_k", self.top_k, low=0)
        check_range("temperature", self.temperature, low=0.0, low_open=True)
        check_range("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        check_range("length_penalty", self.length_penalty)
        check_range("num_return_sequences", self.num_return_sequences, low=0)


def check_range(
    name: str, value: float, low: float | None = None, high: float | None = None, low_open: bool = False
) -> None:
    """InputError naming `name` unless `value` is a finite number in [low, high] (or (low, high] with low_open)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{name}: must be a finite number, got {value!r}", param=name)
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        if high is None:
            want = f"above {low:g}" if low_open else f"at least {low:g}"
        elif low is None:
            want = f"at most {high:g}"
        else:
            want = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise InputError(f"{name}: must be {want}, got {value!r}", param=name)


class _Decoder:
    """Runs the decoder one step at a time over R rows per image, keeping both caches."""

    def __init__(self, model: BLIP, image_embeds: torch.Tensor, rows_per_image: int):
        self.dec = model.text_decoder
        self.image_kv = self.dec.bert.image_kv(image_embeds)  # per layer (B, H, N, d), once per image
        self.rows = rows_per_image
        self.cache: list[list[torch.Tensor]] = [[] for _ in self.dec.bert.encoder.layer]

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """(B*R, t) new ids -> (B*R, V) float32 logits of the last position."""
        h = self.dec.bert(ids, image_kv=self.image_kv, rows_per_kv=self.rows, cache=self.cache)
        return self.dec.logits(h[:, -1]).float()

    def reorder(self, rows: torch.Tensor) -> None:
        """Re-point each row's self-attention cache at its parent row (beam search); rows stay within an image."""
        for layer in self.cache:
            layer[:] = [t.index_select(0, rows) for t in layer]


def _repetition_penalty(scores: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0:
        return scores
    prev = torch.gather(scores, 1, seqs)
    prev = torch.where(prev < 0, prev * penalty, prev / penalty)
    return scores.scatter(1, seqs, prev)


def _process(scores: torch.Tensor, seqs: torch.Tensor, cfg: GenerationConfig, eos: int) -> torch.Tensor:
    """transformers' processors in its order: repetition penalty, then min length (EOS banned while too short)."""
    scores = _repetition_penalty(scores, seqs, cfg.repetition_penalty)
    if seqs.shape[1] < cfg.min_length:
        scores[:, eos] = -float("inf")
    return scores


def _nucleus(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Temperature, top-k, then top-p: keep the smallest set of tokens whose probability reaches top_p.

    Works on the best 256 tokens when they already hold the top-p mass (nearly always), instead of sorting
    the whole vocabulary every step; falls back to the full sort otherwise. Same result either way.
    """
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if cfg.top_p >= 1.0:
        return logits
    k = min(256, logits.shape[-1])
    top, order = torch.topk(logits, k)  # (R, k), descending
    probs = (top - logits.logsumexp(-1, keepdim=True)).exp()
    cum = probs.cumsum(-1)
    if bool((cum[:, -1] >= cfg.top_p).all()):
        # token i stays if the mass before it is below top_p (the first token always stays)
        keep = (cum - probs) < cfg.top_p
        out = torch.full_like(logits, -float("inf"))
        return out.scatter(1, order, top.masked_fill(~keep, -float("inf")))
    sorted_logits, order = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum <= (1 - cfg.top_p)
    drop[:, -1] = False  # always keep the most likely token
    return logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))


@torch.no_grad()
def generate(
    model: BLIP,
    image_embeds: torch.Tensor,
    prompt_ids: list[int],
    cfg: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
) -> list[list[list[int]]]:
    """Generate for (B, N, Dv) image tokens. Returns, per image, `num_return_sequences` lists of new token ids
    (prompt and the final [SEP] removed)."""
    cfg = cfg or GenerationConfig()
    positions = model.config.text.max_positions
    if max(cfg.max_length, len(prompt_ids) + 1) > positions:
        raise InputError(
            f"max_length: {max(cfg.max_length, len(prompt_ids) + 1)} tokens (prompt included) is more than the "
            f"model's {positions} text positions",
            param="max_length",
        )
    if cfg.do_sample or cfg.num_beams == 1:
        return _sample_or_greedy(model, image_embeds, prompt_ids, cfg, generator)
    return _beam_search(model, image_embeds, prompt_ids, cfg)


def _sample_or_greedy(model, image_embeds, prompt_ids, cfg, generator):
    eos, pad = model.config.sep_token_id, model.config.pad_token_id
    B, R = image_embeds.shape[0], cfg.num_return_sequences
    dec = _Decoder(model, image_embeds, R)
    seqs = torch.tensor(prompt_ids, device=image_embeds.device).repeat(B * R, 1)  # (B*R, t)
    done = torch.zeros(B * R, dtype=torch.bool, device=seqs.device)
    logits = dec.step(seqs)
    while True:
        scores = _process(logits, seqs, cfg, eos)
        if cfg.do_sample:
            probs = _nucleus(scores, cfg).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()) or seqs.shape[1] >= cfg.max_length:
            break
        logits = dec.step(nxt[:, None])
    out = [_strip(row, len(prompt_ids), eos) for row in seqs.tolist()]
    return [out[b * R : (b + 1) * R] for b in range(B)]


def _strip(row: list[int], prompt_len: int, eos: int) -> list[int]:
    new = row[prompt_len:]
    return new[: new.index(eos)] if eos in new else new


def _beam_search(model, image_embeds, prompt_ids, cfg):
    eos = model.config.sep_token_id
    B, K, lp = image_embeds.shape[0], cfg.num_beams, cfg.length_penalty
    dev = image_embeds.device
    P, T = len(prompt_ids), cfg.max_length
    dec = _Decoder(model, image_embeds, K)
    keep = 2 * K  # candidate pool, as transformers: enough to continue K beams even if K of them hit EOS
    top_k_mask = torch.arange(keep, device=dev) < K

    running = torch.full((B, K, T), model.config.pad_token_id, dtype=torch.long, device=dev)
    running[:, :, :P] = torch.tensor(prompt_ids, device=dev)
    running_scores = torch.full((B, K), NEG, device=dev)
    running_scores[:, 0] = 0.0  # identical beams at the start: only the first one may expand
    finished = running.clone()
    finished_scores = torch.full((B, K), NEG, device=dev)
    is_finished = torch.zeros((B, K), dtype=torch.bool, device=dev)
    improvable = torch.ones((B, 1), dtype=torch.bool, device=dev)

    cur = P
    logits = dec.step(running[:, :, :P].reshape(B * K, P))
    batch_offset = torch.arange(B, device=dev)[:, None] * K
    while True:
        logp = _process(logits.log_softmax(-1), running[:, :, :cur].reshape(B * K, cur), cfg, eos)
        V = logp.shape[-1]
        acc = (logp.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        cand_scores, cand_idx = torch.topk(acc, keep)  # (B, 2K)
        cand_beam, cand_tok = cand_idx // V, cand_idx % V
        cand = torch.gather(running, 1, cand_beam[:, :, None].expand(-1, -1, T)).clone()  # (B, 2K, T)
        cand[:, :, cur] = cand_tok
        hits = (cand_tok == eos) | (cur + 1 >= T)  # stopping criteria: EOS or max length

        # next running beams: the best K candidates that did not stop
        sel = torch.topk(cand_scores + hits.float() * NEG, K).indices  # (B, K)
        running = torch.gather(cand, 1, sel[:, :, None].expand(-1, -1, T))
        running_scores = torch.gather(cand_scores + hits.float() * NEG, 1, sel)
        parent = torch.gather(cand_beam, 1, sel)  # (B, K) beam each new running beam came from

        # finished hypotheses: stopped candidates among the top K, length-penalised, merged with earlier ones
        just = hits & top_k_mask[None, :]
        fscores = cand_scores / ((cur + 1 - P) ** lp)
        fscores = fscores + (~improvable).float() * NEG + (~just).float() * NEG
        merged = torch.cat([finished_scores, fscores], 1)
        best = torch.topk(merged, K).indices
        finished = torch.gather(torch.cat([finished, cand], 1), 1, best[:, :, None].expand(-1, -1, T))
        finished_scores = torch.gather(merged, 1, best)
        is_finished = torch.gather(torch.cat([is_finished, just], 1), 1, best)

        cur += 1
        best_running = running_scores[:, :1] / ((cur - P) ** lp)
        worst_done = torch.where(
            is_finished, finished_scores.min(1, keepdim=True).values, torch.full_like(finished_scores, NEG)
        )
        improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
        if not bool(improvable.any()) or bool(hits.all()) or cur >= T:
            break
        dec.reorder((parent + batch_offset).view(-1))
        logits = dec.step(running[:, :, cur - 1 : cur].reshape(B * K, 1))

    n = cfg.num_return_sequences
    return [[_strip(finished[b, j].tolist(), P, eos) for j in range(n)] for b in range(B)]
