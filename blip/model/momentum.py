"""Momentum (EMA) copies of the ITC towers and the feature queues, for momentum-distilled ITC.

Kept apart from the BLIP module: the weights users ship (model.safetensors) hold only the online model;
these copies and queues are training state (saved under `train_state/` for exact resume).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from blip.model.blip import BLIP, with_first_token


class Momentum(nn.Module):
    def __init__(self, model: BLIP, queue_size: int = 57600, momentum: float = 0.995):
        super().__init__()
        if not model.config.text_encoder:
            raise ValueError("momentum encoders need a model with a text encoder")
        self.momentum = momentum
        self.cls_token_id = model.config.cls_token_id
        self.visual_encoder_m = copy.deepcopy(model.visual_encoder)
        self.vision_proj_m = copy.deepcopy(model.vision_proj)
        self.text_encoder_m = copy.deepcopy(model.text_encoder)
        for layer in self.text_encoder_m.encoder.layer:
            layer.crossattention = None  # ITC never cross-attends: no need to keep a copy
        self.text_proj_m = copy.deepcopy(model.text_proj)
        for p in self.parameters():
            p.requires_grad_(False)
        self.visual_encoder_m.grad_ckpt_layers = 0
        e = model.config.embed_dim
        self.register_buffer("image_queue", F.normalize(torch.randn(queue_size, e), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(queue_size, e), dim=1))
        self.register_buffer("idx_queue", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_full", torch.zeros((), dtype=torch.bool))
        """True once the queue wrapped around: every slot holds real features."""

    def pairs(self, model: BLIP) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ours, theirs = [], []
        for mine, online in [
            (self.visual_encoder_m, model.visual_encoder),
            (self.vision_proj_m, model.vision_proj),
            (self.text_encoder_m, model.text_encoder),
            (self.text_proj_m, model.text_proj),
        ]:
            online_params = dict(online.named_parameters())
            for name, p in mine.named_parameters():
                ours.append(p)
                theirs.append(online_params[name])
        return ours, theirs

    @torch.no_grad()
    def update(self, model: BLIP) -> None:
        """p_m <- m * p_m + (1 - m) * p."""
        ours, theirs = self.pairs(model)
        torch._foreach_lerp_(ours, [t.detach() for t in theirs], 1.0 - self.momentum)

    @torch.no_grad()
    def features(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Momentum ITC features: (B, E) image, (B, E) text, unit norm."""
        image_feat = F.normalize(self.vision_proj_m(self.visual_encoder_m(pixel_values)[:, 0]), dim=-1)
        h = self.text_encoder_m(with_first_token(input_ids, self.cls_token_id), attention_mask)
        text_feat = F.normalize(self.text_proj_m(h[:, 0]), dim=-1)
        return image_feat, text_feat

    def filled(self) -> torch.Tensor:
        """(Q,) bool: queue slots that hold real features (the rest still hold the random initial vectors)."""
        slots = torch.arange(self.idx_queue.shape[0], device=self.idx_queue.device)
        return (slots < self.queue_ptr) | self.queue_full

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> None:
        """Write a (gathered) batch into the circular queues, wrapping around the end."""
        q = self.image_queue.shape[0]
        if q == 0:  # queue_size 0: in-batch negatives only
            return
        n = min(image_feat.shape[0], q)
        pos = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % q
        self.image_queue[pos] = image_feat[-n:]
        self.text_queue[pos] = text_feat[-n:]
        self.idx_queue[pos] = idx[-n:]
        if int(self.queue_ptr) + n >= q:
            self.queue_full.fill_(True)
        self.queue_ptr.fill_(int((self.queue_ptr + n) % q))
