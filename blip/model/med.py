"""MED: the BERT-layout text transformer of BLIP (multimodal mixture of encoder-decoder).

Each layer is self-attention -> cross-attention over image tokens -> FFN. The same module class serves as
- the unimodal text encoder (ITC): bidirectional, cross-attention skipped;
- the image-grounded encoder (ITM): bidirectional, cross-attention on;
- the image-grounded decoder (LM): causal self-attention, cross-attention on.
Parameter names follow the original med.py (`attention.self.query`, `crossattention.output.dense`, ...).

Shapes: B batch, L text length, N image tokens, D hidden, H heads, d head dim, R text rows per image.
Cross-attention K/V can be precomputed once per image (`image_kv`) and shared by R rows of text (beams,
sampled captions, retrieval candidates): the R rows are folded into the query length, so no K/V copy is made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip.config import TextConfig

KV = tuple[torch.Tensor, torch.Tensor]


class SelfAttention(nn.Module):
    """Named `self` inside `attention` / `crossattention`, as the original."""

    def __init__(self, hidden: int, heads: int, kv_width: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.dropout = dropout

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, H, L, d)

    def project_kv(self, x: torch.Tensor) -> KV:
        return self.split(self.key(x)), self.split(self.value(x))

    def forward(
        self,
        h: torch.Tensor,
        kv: KV,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        rows_per_kv: int = 1,
    ) -> torch.Tensor:
        B, L, D = h.shape
        q = self.split(self.query(h))  # (B, H, L, d)
        k, v = kv
        if rows_per_kv > 1:  # (B*R, H, L, d) -> (B, H, R*L, d): R text rows share one image's K/V
            R = rows_per_kv
            q = q.view(B // R, R, self.heads, L, -1).transpose(1, 2).reshape(B // R, self.heads, R * L, -1)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal and mask is None)
        if rows_per_kv > 1:
            R = rows_per_kv
            out = out.view(B // R, self.heads, R, L, -1).transpose(1, 2).reshape(B, self.heads, L, -1)
        return out.transpose(1, 2).reshape(B, L, D)  # (B, L, D)


class SelfOutput(nn.Module):
    def __init__(self, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.self = SelfAttention(cfg.hidden, cfg.heads, kv_width, cfg.dropout)
        self.output = SelfOutput(cfg.hidden, cfg.layer_norm_eps, cfg.dropout)


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.mlp_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(h))


class Output(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.mlp_dim, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class Layer(nn.Module):
    def __init__(self, cfg: TextConfig, encoder_width: int):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden)
        self.crossattention = Attention(cfg, encoder_width)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)

    def forward(
        self,
        h: torch.Tensor,
        self_mask: torch.Tensor | None,
        is_causal: bool,
        image_kv: KV | None,
        rows_per_kv: int,
        cache: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        sa = self.attention.self
        k, v = sa.project_kv(h)  # (B, H, L, d)
        if cache is not None:  # incremental decoding: append this step's K/V to the running cache
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        a = self.attention.output(sa(h, (k, v), self_mask, is_causal), h)
        if image_kv is not None:
            c = self.crossattention.self(a, image_kv, None, False, rows_per_kv)
            a = self.crossattention.output(c, a)
        return self.output(self.intermediate(a), a)


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        L = input_ids.shape[1]
        if past_length + L > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text length {past_length + L} exceeds max_positions {self.position_embeddings.num_embeddings}"
            )
        pos = torch.arange(past_length, past_length + L, device=input_ids.device)
        return self.dropout(self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos)))


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig, encoder_width: int):
        super().__init__()
        self.layer = nn.ModuleList([Layer(cfg, encoder_width) for _ in range(cfg.layers)])


class BertModel(nn.Module):
    """The MED text transformer. `causal=True` makes it the decoder; image inputs switch cross-attention on."""

    def __init__(self, cfg: TextConfig, encoder_width: int, causal: bool = False):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg, encoder_width)
        self.causal = causal

    def image_kv(self, image_embeds: torch.Tensor) -> list[KV]:
        """Cross-attention K/V of every layer for (B, N, Dv) image tokens: compute once, reuse for many texts."""
        dev = image_embeds.device.type
        if torch.is_autocast_enabled(dev):  # cast the image tokens once, not in each of the 2 x layers projections
            image_embeds = image_embeds.to(torch.get_autocast_dtype(dev))
        return [layer.crossattention.self.project_kv(image_embeds) for layer in self.encoder.layer]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_kv: list[KV] | None = None,
        rows_per_kv: int = 1,
        cache: list[list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) hidden states.

        attention_mask: (B, L) 1 = token, 0 = padding (None: no padding). Image tokens are never padded.
        image_embeds / image_kv: cross-attend to these image tokens (mode 'multimodal'); neither: text only.
        cache: per-layer [k, v] lists, filled and extended in place (decoder, incremental generation).
        """
        past = cache[0][0].shape[2] if cache and cache[0] else 0
        h = self.embeddings(input_ids, past)  # (B, L, D)
        if image_kv is None and image_embeds is not None:
            image_kv = self.image_kv(image_embeds)
        L = input_ids.shape[1]
        mask = self._self_mask(attention_mask, L, past)
        is_causal = self.causal and mask is None and past == 0 and L > 1
        for i, layer in enumerate(self.encoder.layer):
            kv = image_kv[i] if image_kv is not None else None
            h = layer(h, mask, is_causal, kv, rows_per_kv, cache[i] if cache is not None else None)
        return h

    def _self_mask(self, attention_mask: torch.Tensor | None, L: int, past: int) -> torch.Tensor | None:
        """Boolean SDPA mask (True = attend), or None when plain `is_causal`/no mask suffices."""
        if attention_mask is None or bool(attention_mask.all()):
            if self.causal and past > 0 and L > 1:
                return torch.ones(
                    L, past + L, dtype=torch.bool, device=self.embeddings.position_embeddings.weight.device
                ).tril(diagonal=past)
            return None
        keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, past + L)
        if keys.shape[-1] != past + L:
            raise ValueError("attention_mask must cover the cached and the new tokens")
        if self.causal:
            tri = torch.ones(L, past + L, dtype=torch.bool, device=keys.device).tril(diagonal=past)
            keys = keys & tri  # (B, 1, L, past + L); right padding: every row still sees position 0
        return keys


class PredictionHeadTransform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(h)))


class LMPredictionHead(nn.Module):
    """`cls.predictions`: transform, then the decoder (its weight usually tied to the word embeddings)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = PredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(h), self.decoder.weight, self.bias)


class OnlyMLMHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.predictions = LMPredictionHead(cfg)


class BertLMHeadModel(nn.Module):
    """`text_decoder`: a causal BertModel (`bert`) plus the LM head (`cls`), tied to the word embeddings unless
    `tie_lm_head=False` (a separate head matrix, for checkpoints trained that way)."""

    def __init__(self, cfg: TextConfig, encoder_width: int, tie_lm_head: bool = True):
        super().__init__()
        self.bert = BertModel(cfg, encoder_width, causal=True)
        self.cls = OnlyMLMHead(cfg)
        if tie_lm_head:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cls.predictions(hidden)  # (B, L, V)
