"""Initialise a fresh BLIP from unimodal pre-trained weights, as the original pre-training does.

- Text (`text_init`): a local Hugging Face BERT directory. Embeddings, self-attention and FFN go into the text
  encoder; the decoder's self-attention gets the same BERT self-attention (the original loads bert-base-uncased
  into both and then ties them); BertForMaskedLM's `cls.predictions` initialises the LM head. Cross-attention
  stays random (BERT has none). Vocabulary rows beyond BERT's (BLIP's [DEC], [ENC]) stay random.
- Vision (`vision_init`): a timm model name (downloads its pretrained weights: needs network), a local
  .pth/.safetensors state dict of a timm ViT (e.g. DeiT-B as the original), or the output directory of a
  blip.vision_pretrain run (its vit.safetensors). The classifier head is dropped and the position embeddings are
  interpolated to the model's image size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from blip.config import VisionConfig
from blip.errors import InputError
from blip.model.blip import BLIP
from blip.model.vit import interpolate_pos_embed

_BERT_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(attention|intermediate|output)\.(.+)$")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A tensor state dict from .safetensors or a (weights-only) torch pickle; unwraps {"model"/"state_dict": ...}."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not a plain tensor checkpoint"
        raise InputError(f"cannot read {p} as a weights-only PyTorch state dict: {type(e).__name__}: {e}") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{p}: expected a state dict of tensors")
    return obj


# ---- text: Hugging Face BERT --------------------------------------------------------------------------------
def _bert_weights(d: Path) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (d / name).exists():
            return read_state_dict(d / name)
    raise InputError(f"text_init {d}: no model.safetensors or pytorch_model.bin (expected a Hugging Face BERT dir)")


def _bert_name(k: str) -> str:
    """Strip the BertModel prefix and old TF-style LayerNorm names."""
    k = k.removeprefix("bert.")
    return k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def init_text_from_bert(model: BLIP, bert_dir: str | Path) -> list[str]:
    """Copy a local HF BERT's weights into the text encoder / decoder (see module doc). Returns loaded names."""
    d = Path(bert_dir)
    if not d.is_dir():
        raise InputError(f"text_init: not a directory: {d} (expected a local Hugging Face BERT directory)")
    if (d / "config.json").exists():
        mt = json.loads((d / "config.json").read_text()).get("model_type")
        if mt not in (None, "bert"):
            raise InputError(f"text_init {d}: model_type {mt!r} is not BERT")
    src = {_bert_name(k): v for k, v in _bert_weights(d).items()}
    targets: dict[str, torch.Tensor] = {}  # our name -> tensor to copy (possibly into a prefix of the rows)
    for k, v in src.items():
        if k.startswith("embeddings.") and "token_type" not in k and "position_ids" not in k:
            targets[f"text_encoder.{k}"] = v
        elif m := _BERT_LAYER.match(k):
            targets[f"text_encoder.{k}"] = v
            if m.group(2) == "attention" and model.config.text_decoder:
                targets[f"text_decoder.bert.{k}"] = v  # the decoder's (causal) self-attention starts from BERT
        elif k.startswith("cls.predictions.") and model.config.text_decoder and "decoder.weight" not in k:
            targets[f"text_decoder.{k}"] = v
    if not model.config.text_encoder:
        targets = {k.replace("text_encoder.", "text_decoder.bert.", 1): v for k, v in targets.items()}
    own = dict(model.named_parameters(remove_duplicate=False))
    loaded = []
    with torch.no_grad():
        for k, v in targets.items():
            if k not in own:
                continue  # a BERT layer beyond the model's depth
            p = own[k]
            if k.endswith(("word_embeddings.weight", "position_embeddings.weight", "predictions.bias")):
                n = min(p.shape[0], v.shape[0])  # vocabulary / positions: copy the common rows
                if p.shape[1:] != v.shape[1:]:
                    raise InputError(f"text_init {d}: {k} has shape {tuple(v.shape)}, the model {tuple(p.shape)}")
                p[:n].copy_(v[:n])
            elif p.shape != v.shape:
                raise InputError(
                    f"text_init {d}: {k} has shape {tuple(v.shape)} but the model needs {tuple(p.shape)} "
                    "(use a BERT with the model's hidden size)"
                )
            else:
                p.copy_(v)
            loaded.append(k)
    if not loaded:
        raise InputError(f"text_init {d}: no BERT weights matched (expected bert.embeddings.*, bert.encoder.layer.*)")
    return loaded


# ---- vision: timm ViT --------------------------------------------------------------------------------------------
def _timm_weights(spec: str) -> dict[str, torch.Tensor]:
    p = Path(spec).expanduser()
    if p.is_dir():  # a blip.vision_pretrain run
        from blip.vision_pretrain import WEIGHTS

        if not (p / WEIGHTS).is_file():
            raise InputError(f"vision_init {spec}: a directory without {WEIGHTS} (not a finished vision pre-training)")
        return read_state_dict(p / WEIGHTS)
    if p.is_file():
        return read_state_dict(p)
    if p.suffix in (".pth", ".pt", ".bin", ".safetensors") or "/" in spec:
        raise InputError(f"vision_init: no such file: {spec}")
    import timm

    if spec not in timm.list_models(pretrained=True) and spec.split(".")[0] not in timm.list_models():
        raise InputError(f"vision_init: {spec!r} is neither a file nor a timm model name with pretrained weights")
    try:
        return timm.create_model(spec, pretrained=True, num_classes=0).state_dict()
    except Exception as e:  # noqa: BLE001 - mostly: no network
        raise InputError(
            f"vision_init: cannot fetch timm weights for {spec!r} ({type(e).__name__}). Without network, save the "
            "timm model's state_dict to a .pth/.safetensors file elsewhere and pass its path"
        ) from None


def _check_tower_shape(spec: str, want: VisionConfig) -> None:
    """A vision pre-training run records its tower's shape: name what differs instead of listing stray keys."""
    from blip.vision_pretrain import read_vision_config

    have = read_vision_config(spec) if Path(spec).expanduser().is_dir() else None
    if have is None:
        return
    keys = ("stem", "patch_size", "width", "depth", "heads", "mlp_dim")
    diff = [f"{k} {getattr(have, k)!r} (the model has {getattr(want, k)!r})" for k in keys
            if getattr(have, k) != getattr(want, k)]  # fmt: skip
    if diff:
        raise InputError(f"vision_init {spec}: the tower was trained with {', '.join(diff)}; build the model alike")


def init_vision_from_timm(model: BLIP, spec: str) -> list[str]:
    """Load a timm ViT's weights into `visual_encoder` (head dropped, pos_embed interpolated). Returns names."""
    sd = {}
    for k, v in _timm_weights(spec).items():
        k = k.removeprefix("module.").removeprefix("visual_encoder.")
        if k.startswith(("head", "fc_norm", "pre_logits", "head_dist")):
            continue
        sd[k] = v
    if "dist_token" in sd:
        raise InputError(f"vision_init {spec}: distilled ViTs (dist_token) are not supported; use a plain ViT/DeiT")
    vit = model.visual_encoder
    _check_tower_shape(spec, model.config.vision)
    if "pos_embed" in sd and sd["pos_embed"].shape != vit.pos_embed.shape:
        sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], vit.pos_embed.shape[1] - 1)
    own = vit.state_dict()
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise InputError(f"vision_init {spec}: shape mismatch for {', '.join(bad[:5])} (a ViT of another size?)")
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    if missing:
        raise InputError(f"vision_init {spec}: missing ViT weights {missing[:5]} (not a timm ViT state dict?)")
    if unexpected:
        raise InputError(f"vision_init {spec}: unexpected keys {unexpected[:5]} (not a timm ViT state dict?)")
    return [f"visual_encoder.{k}" for k in sd]
