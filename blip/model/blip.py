"""The BLIP multimodal mixture of encoder-decoder: ViT + MED text encoder/decoder + ITC/ITM/LM heads.

One class serves every released layout: a captioner (decoder only), a filter/retrieval model (encoder,
projections, ITM head) and the pre-training model (both, sharing all but self-attention). Parameter names
are the original ones (`visual_encoder.*`, `text_encoder.*`, `text_decoder.bert.*`, `text_decoder.cls.*`,
`vision_proj`, `text_proj`, `itm_head`, `temp`), so an original `.pth` state dict loads directly.

Token conventions (the original's): the tokenizer emits [CLS] ... [SEP]; position 0 is then overwritten with
[ENC] for the image-grounded encoder (ITM) and [DEC] for the decoder (LM); ITC keeps [CLS].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip.config import BlipConfig
from blip.model.med import KV, BertLMHeadModel, BertModel
from blip.model.vit import ViT


def with_first_token(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Copy of (B, L) ids with position 0 replaced (the [CLS] -> [ENC]/[DEC] rule)."""
    ids = input_ids.clone()
    ids[:, 0] = token_id
    return ids


class BLIP(nn.Module):
    def __init__(self, cfg: BlipConfig):
        super().__init__()
        if not (cfg.text_encoder or cfg.text_decoder):
            raise ValueError("a BLIP model needs a text encoder, a text decoder, or both")
        self.config = cfg
        vw, th = cfg.vision.width, cfg.text.hidden
        self.visual_encoder = ViT(cfg.vision)
        if cfg.text_encoder:
            self.text_encoder = BertModel(cfg.text, vw)
            self.vision_proj = nn.Linear(vw, cfg.embed_dim)
            self.text_proj = nn.Linear(th, cfg.embed_dim)
            self.itm_head = nn.Linear(th, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))
        if cfg.text_decoder:
            self.text_decoder = BertLMHeadModel(cfg.text, vw, tie_lm_head=cfg.tie_lm_head)
        self._init_text_weights()
        if self.shares_text:
            tie_encoder_decoder(self.text_encoder, self.text_decoder, cfg.tie_lm_head)

    @property
    def shares_text(self) -> bool:
        c = self.config
        return c.text_encoder and c.text_decoder and c.share_text

    def _init_text_weights(self) -> None:
        """BERT initialisation (normal 0.02) for everything outside the ViT (timm initialises its own)."""
        for name, m in self.named_modules():
            if name.startswith("visual_encoder"):
                continue
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- image side -------------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, Dv) image tokens."""
        return self.visual_encoder(pixel_values)

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, Dv) -> (B, E) unit-norm ITC features of the image [CLS] token."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    # ---- text encoder: ITC and ITM ----------------------------------------------------------------------------
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) [CLS]-first ids -> (B, E) unit-norm ITC features (unimodal text encoder, no cross-attention)."""
        ids = with_first_token(input_ids, self.config.cls_token_id)
        h = self.text_encoder(ids, attention_mask)  # (B, L, D)
        return F.normalize(self.text_proj(h[:, 0]), dim=-1)

    def itm_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_kv: list[KV] | None = None,
        rows_per_kv: int = 1,
    ) -> torch.Tensor:
        """(B, L) ids + image -> (B, 2) ITM logits (index 1 = match), position 0 forced to [ENC].

        Pass `image_kv` (from `text_encoder.image_kv`) with `rows_per_kv=R` to score R texts per image without
        copying the image's cross-attention keys and values.
        """
        ids = with_first_token(input_ids, self.config.enc_token_id)
        h = self.text_encoder(
            ids, attention_mask, image_embeds=image_embeds, image_kv=image_kv, rows_per_kv=rows_per_kv
        )
        return self.itm_head(h[:, 0])

    # ---- text decoder: LM -------------------------------------------------------------------------------------
    def lm_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) ids + image -> (B, L, V) next-token logits, position 0 forced to [DEC]."""
        ids = with_first_token(input_ids, self.config.bos_token_id)
        h = self.text_decoder.bert(ids, attention_mask, image_embeds=image_embeds)
        return self.text_decoder.logits(h)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def tie_encoder_decoder(encoder: BertModel, decoder: BertLMHeadModel, tie_lm_head: bool = True) -> None:
    """Share embeddings, cross-attention and FFN between encoder and decoder; keep self-attention separate.

    This is the paper's best setting ("all except SA", 252M parameters for ViT-B). The state dict still lists
    the shared tensors under both prefixes, as the original pre-training checkpoints do.
    """
    dec = decoder.bert
    dec.embeddings = encoder.embeddings
    for e, d in zip(encoder.encoder.layer, dec.encoder.layer, strict=True):
        d.crossattention = e.crossattention
        d.intermediate = e.intermediate
        d.output = e.output
    if tie_lm_head:
        decoder.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight
