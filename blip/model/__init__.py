"""BLIP model: ViT image encoder, MED text transformer, and the multimodal mixture that ties them together."""

from blip.model.blip import BLIP

__all__ = ["BLIP"]
