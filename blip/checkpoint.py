"""Checkpoints: the native directory format, Hugging Face BLIP directories, and original Salesforce `.pth`.

Native layout (DESIGN §6): `config.json` (model config, token ids, image size), `model.safetensors`, tokenizer
files; training adds `train_state/`. Loading never executes pickled code: safetensors, or
`torch.load(weights_only=True)`, which refuses pickles that would run code.

One resolver (`load_model`) accepts any of: a blipctl directory, an HF BLIP directory
(BlipForConditionalGeneration / BlipForImageTextRetrieval / BlipForQuestionAnswering layouts) or hub id,
an original/LAVIS `.pth` file.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blip.atomic import atomic_path, temp_dir, umask_modes
from blip.config import BlipConfig, TextConfig, VisionConfig
from blip.errors import InputError
from blip.model.blip import BLIP
from blip.model.vit import interpolate_pos_embed
from blip.outputs import check_output_dir, install_dir, mark
from blip.tokenizer import Tokenizer

FORMAT = "blipctl"
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
DEFAULT_FILTER = "Salesforce/blip-itm-base-coco"

# keys of the original checkpoints that are training state, not model weights
_TRAINING_KEYS = re.compile(
    r"(_m\.|_m$|^image_queue$|^text_queue$|^idx_queue$|^queue_ptr$|^ptr_queue$|position_ids$"
    r"|cls\.predictions\.decoder\.bias$)"  # HF's alias of cls.predictions.bias
)


@dataclass
class Loaded:
    model: BLIP
    tokenizer: Tokenizer
    source: str
    kind: str
    """'blipctl', 'hf' or 'pth'."""


# ---- the resolver ------------------------------------------------------------------------------------------------
def load_model(
    source: str | os.PathLike,
    tokenizer: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
) -> Loaded:
    """Load a model from any supported source; `image_size` interpolates the position embeddings.

    LM heads: a checkpoint whose head (text_decoder.cls.predictions.decoder.weight) differs from the word
    embeddings (.pth, or HF with tie_word_embeddings false) loads UNTIED (config.tie_lm_head = False) and
    generates exactly as it was trained; a native config that says tied over weights that differ is refused
    (InputError). A head is never tied silently."""
    src = str(source)
    p = Path(src).expanduser()
    if p.is_dir():
        kind = detect_dir_kind(p)
        model, tok = _load_native(p) if kind == FORMAT else _load_hf(p)
    elif p.is_file():
        kind = "pth"
        model, tok = _load_pth(p, tokenizer)
    elif _looks_like_hub_id(src) and not _looks_local(p):
        return load_model(_download(src), tokenizer, image_size, device)
    else:
        where = f"; {p.parent} exists but holds no {p.name!r}" if p.parent != Path(".") and p.parent.is_dir() else ""
        raise InputError(
            f"model source not found: {src}: no such file or directory{where} "
            f"(expected a checkpoint directory, a .pth file or a Hugging Face hub id such as {DEFAULT_CAPTIONER})"
        )
    if tokenizer is not None and kind != "pth":
        tok = Tokenizer.from_pretrained(tokenizer)
    _check_vocab(model, tok, src)
    if image_size is not None and image_size != model.config.vision.image_size:
        model = resize_image(model, image_size)
    return Loaded(model.to(device).eval(), tok, src, kind)


def detect_dir_kind(p: Path) -> str:
    cfg_path = p / "config.json"
    if not cfg_path.exists():
        raise InputError(f"{p} has no config.json: not a blipctl or Hugging Face BLIP checkpoint directory")
    cfg = _read_json(cfg_path)
    if cfg.get("format") == FORMAT:
        return FORMAT
    archs = cfg.get("architectures") if isinstance(cfg.get("architectures"), list) else []
    if cfg.get("model_type") == "blip" or any(str(a).startswith("Blip") for a in archs):
        return "hf"
    raise InputError(f"{cfg_path}: not a BLIP config (model_type={cfg.get('model_type')!r})")


def _looks_like_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", s)) and not s.startswith((".", "/"))


def _looks_local(p: Path) -> bool:
    """A missing path that is surely meant as a local one, not a hub id `owner/name`: a checkpoint file name
    (`runs/x.pth`), or one whose first directory exists here (`runs/modle` mistyped, with `runs/` present)."""
    return p.suffix.lower() in (".pth", ".pt", ".bin", ".safetensors", ".json") or Path(p.parts[0]).is_dir()


def _download(repo_id: str) -> str:
    """Fetch a hub repo for users with network; fail at once, with the way out, without it."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise InputError(
            f"cannot fetch {repo_id!r}: HF_HUB_OFFLINE is set. Download it where there is network "
            f"(`huggingface-cli download {repo_id} --local-dir DIR`) and pass DIR instead of the hub id"
        )
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "pytorch_model.bin"], etag_timeout=5
        )
    except Exception as e:  # noqa: BLE001 - any hub/network failure means the same thing to the user
        raise InputError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}). Without network, download "
            f"it elsewhere (`huggingface-cli download {repo_id} --local-dir DIR`) and pass DIR instead of the hub id"
        ) from None


def _check_vocab(model: BLIP, tok: Tokenizer, src: str) -> None:
    v = model.config.text.vocab_size
    if len(tok) > v:
        raise InputError(f"{src}: tokenizer has {len(tok)} tokens but the model's vocabulary is {v}")
    c = model.config
    if (tok.bos_id, tok.enc_id) != (c.bos_token_id, c.enc_token_id) and c.text_decoder:
        # trust the tokenizer for [ENC]; keep the model's decoder start id (what it was trained with)
        c.enc_token_id = tok.enc_id


# ---- native ------------------------------------------------------------------------------------------------------
def save_checkpoint(
    model: BLIP, tokenizer: Tokenizer, out_dir: str | os.PathLike, extra: dict | None = None, overwrite: bool = False
) -> Path:
    """Write a native checkpoint directory through a temporary sibling: a new directory appears whole; into an
    existing checkpoint (or any non-empty directory with `overwrite`) the files are replaced one by one, config.json
    last, and no other file is deleted. Any other non-empty directory is refused (blip.outputs)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    check_output_dir(out, "checkpoint", overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        meta = {"format": FORMAT, "version": 1, "model": model.config.to_dict(), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        save_file(unique_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp)
        umask_modes(tmp)
        install_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory into place; an existing `out` is replaced, never half-written."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each shared tensor stored once (safetensors refuses aliases); contiguous CPU copies."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = k
        out[k] = v.detach().to("cpu").contiguous()
    return out


def _load_native(p: Path) -> tuple[BLIP, Tokenizer]:
    meta = _read_json(p / "config.json")
    if not isinstance(meta.get("model"), dict):
        raise InputError(f"{p / 'config.json'}: no 'model' object (the model config of a blipctl checkpoint)")
    try:
        cfg = BlipConfig.from_dict(meta["model"])
    except InputError as e:
        raise InputError(f"{p / 'config.json'}: bad model config: {e}") from None
    model = BLIP(cfg)
    weights = p / "model.safetensors"
    if not weights.exists():
        raise InputError(f"{p}: missing model.safetensors")
    load_weights(model, read_safetensors(weights), str(weights))
    return model, Tokenizer.from_pretrained(p)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or garbage file is an InputError naming it (not a parser error)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean "not a readable weights file"
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a readable safetensors file (truncated or corrupt?): {detail}") from None


def load_weights(model: BLIP, sd: dict[str, torch.Tensor], where: str, strict: bool = True) -> None:
    """Load a state dict in original/native names; shared (tied) tensors may be present once or twice."""
    if LM_DECODER_BIAS in sd:
        # the original head adds decoder.bias: under transformers 4 the same tensor as cls.predictions.bias, under 5
        # the only one resize_token_embeddings grows (BLIP_Pretrain there saves a stale 30522-long .bias)
        sd = {**sd, "text_decoder.cls.predictions.bias": sd[LM_DECODER_BIAS]}
    sd = {k: v for k, v in sd.items() if not _TRAINING_KEYS.search(k)}
    pe = "visual_encoder.pos_embed"
    if pe in sd and sd[pe].shape != model.visual_encoder.pos_embed.shape:
        sd[pe] = interpolate_pos_embed(sd[pe], model.visual_encoder.pos_embed.shape[1] - 1)
    own = model.state_dict()
    shape_bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if shape_bad:
        raise InputError(f"{where}: shape mismatch for {', '.join(shape_bad[:5])}")
    _check_lm_head(model, sd, where)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # a tied tensor needs loading under only one of its names
    missing = [k for k in missing if not _loaded_through_alias(model, k, sd)]
    missing = [k for k in missing if k != "temp"]  # HF retrieval checkpoints carry no ITC temperature: keep 0.07
    if strict and (missing or unexpected):
        raise InputError(
            f"{where}: weights do not match the model (missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )


LM_HEAD = "text_decoder.cls.predictions.decoder.weight"
LM_DECODER_BIAS = "text_decoder.cls.predictions.decoder.bias"
DEC_EMBED = "text_decoder.bert.embeddings.word_embeddings.weight"


def lm_head_untied(sd: dict[str, torch.Tensor], embed_key: str = DEC_EMBED) -> bool:
    """True when a state dict carries an LM head matrix that differs from the decoder's word embeddings."""
    return LM_HEAD in sd and embed_key in sd and not _tensors_equal(sd, LM_HEAD, embed_key)


def _check_lm_head(model: BLIP, sd: dict[str, torch.Tensor], where: str) -> None:
    """Never tie silently: a model whose head IS its word embeddings cannot take a checkpoint where they differ
    (loading would keep whichever tensor came last). Loaders build such checkpoints with tie_lm_head=False."""
    params = dict(model.named_parameters(remove_duplicate=False))
    head = params.get(LM_HEAD)
    if head is None or LM_HEAD not in sd:
        return
    aliases = [k for k, p in params.items() if p is head and k != LM_HEAD and k in sd]
    if any(not _tensors_equal(sd, LM_HEAD, k) for k in aliases):
        raise InputError(
            f"{where}: the LM head ({LM_HEAD}) differs from the word embeddings ({aliases[0]}), but the model "
            f"config ties them (tie_lm_head = true). Set tie_lm_head = false in the model config to load the "
            f"head as it is; blipctl never ties an untied head silently"
        )


def _loaded_through_alias(model: BLIP, key: str, sd: dict[str, torch.Tensor]) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    t = params.get(key)
    if t is None:
        return False
    return any(k in sd and p is t for k, p in params.items() if k != key)


# ---- original .pth -----------------------------------------------------------------------------------------------
def _load_pth(p: Path, tokenizer: str | None) -> tuple[BLIP, Tokenizer]:
    sd, embedded = read_pth(p, with_config=True)
    hints = {"vision": embedded["vision"]["heads"], "text": embedded["text"]["heads"]} if embedded else {}
    cfg = config_from_state_dict(sd, hints or _head_hints(p, tokenizer))
    tok = _tokenizer_for_pth(p, tokenizer)
    cfg.bos_token_id, cfg.enc_token_id = tok.bos_id, tok.enc_id
    cfg.pad_token_id, cfg.cls_token_id, cfg.sep_token_id = tok.pad_id, tok.cls_id, tok.sep_id
    model = BLIP(cfg)
    load_weights(model, sd, str(p))
    return model, tok


def _head_hints(p: Path, tokenizer: str | None) -> dict[str, int]:
    """Attention head counts, which a state dict cannot tell: from a blipctl/HF config.json beside the .pth
    (or in the --tokenizer directory)."""
    for d in (p.parent / p.stem, p.parent, Path(tokenizer) if tokenizer else None):
        if d is None or not (d / "config.json").is_file():
            continue
        c = _read_json(d / "config.json")
        if c.get("format") == FORMAT:
            m = c.get("model")
            heads = [m.get(t, {}).get("heads") if isinstance(m, dict) and isinstance(m.get(t), dict) else None
                     for t in ("vision", "text")]  # fmt: skip
            if not all(isinstance(h, int) and h > 0 for h in heads):
                raise InputError(
                    f"{d / 'config.json'}: a blipctl config with no model.vision.heads / model.text.heads "
                    f"(read for the attention head counts of {p.name})"
                )
            return {"vision": heads[0], "text": heads[1]}
        if "vision_config" in c or "text_config" in c:
            return {
                "vision": c.get("vision_config", {}).get("num_attention_heads", 12),
                "text": c.get("text_config", {}).get("num_attention_heads", 12),
            }
    return {}


def _heads(width: int, hint: int | None) -> int:
    if hint:
        return hint
    return width // 64 if width % 64 == 0 else max(1, width // 8)  # released models: 64-dim heads


def read_pth(p: Path, with_config: bool = False):
    """Read an original/LAVIS checkpoint (`{"model": state_dict, ...}` or a bare state dict) without running code.

    With `with_config`, also return the model config our own exports embed (`blipctl_config`), or None.
    """
    import pickle

    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(
            f"refusing to load {p}: its pickle references code that loading would execute "
            f"({str(e).splitlines()[0][:200]}). Only plain tensor checkpoints are accepted."
        ) from None
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read {p} as a PyTorch checkpoint: {type(e).__name__}: {e}") from None
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    embedded = obj.get("blipctl_config") if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"{p}: expected a state dict or {{'model': state_dict}}")
    return (sd, embedded if isinstance(embedded, dict) else None) if with_config else sd


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def config_from_state_dict(sd: dict[str, torch.Tensor], heads: dict[str, int] | None = None) -> BlipConfig:
    """Infer sizes from tensor shapes; head counts from `heads` hints, else head dimension 64 (every released
    model), else 8 for widths that are no multiple of 64 (tiny test models)."""
    heads = heads or {}
    try:
        width = sd["visual_encoder.cls_token"].shape[-1]
        patch = sd["visual_encoder.patch_embed.proj.weight"].shape[-1]
        n = sd["visual_encoder.pos_embed"].shape[1] - 1
        vision = VisionConfig(
            image_size=math.isqrt(n) * patch,
            patch_size=patch,
            width=width,
            depth=_count(sd, r"visual_encoder\.blocks\.(\d+)\."),
            heads=_heads(width, heads.get("vision")),
            mlp_dim=sd["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        )
    except KeyError as e:
        raise InputError(f"not a BLIP checkpoint: missing {e.args[0]}") from None
    has_enc = "text_encoder.embeddings.word_embeddings.weight" in sd
    has_dec = "text_decoder.bert.embeddings.word_embeddings.weight" in sd
    if not (has_enc or has_dec):
        raise InputError("not a BLIP checkpoint: no text_encoder.* or text_decoder.* weights")
    pre = "text_encoder." if has_enc else "text_decoder.bert."
    vocab, hidden = sd[pre + "embeddings.word_embeddings.weight"].shape
    text = TextConfig(
        vocab_size=vocab,
        hidden=hidden,
        layers=_count(sd, re.escape(pre) + r"encoder\.layer\.(\d+)\."),
        heads=_heads(hidden, heads.get("text")),
        mlp_dim=sd[pre + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_positions=sd[pre + "embeddings.position_embeddings.weight"].shape[0],
    )
    shared = (
        has_enc
        and has_dec
        and _tensors_equal(
            sd,
            "text_encoder.encoder.layer.0.intermediate.dense.weight",
            "text_decoder.bert.encoder.layer.0.intermediate.dense.weight",
        )
    )
    embed = sd["vision_proj.weight"].shape[0] if "vision_proj.weight" in sd else 256
    return BlipConfig(
        vision=vision,
        text=text,
        embed_dim=embed,
        text_encoder=has_enc,
        text_decoder=has_dec,
        share_text=bool(shared),
        tie_lm_head=not (has_dec and lm_head_untied(sd)),
    )


def _tensors_equal(sd: dict, a: str, b: str) -> bool:
    return a in sd and b in sd and sd[a].shape == sd[b].shape and bool(torch.equal(sd[a], sd[b]))


def _tokenizer_for_pth(p: Path, tokenizer: str | None) -> Tokenizer:
    """`tokenizer`, else tokenizer files beside the .pth, else bert-base-uncased (+[DEC]/[ENC]) from the network or
    the Hugging Face cache. Offline and uncached, transformers 5 returns a 5-token BERT tokenizer without an error:
    refused here, since it decodes every caption to an empty string."""
    from blip.tokenizer import SPECIALS

    if tokenizer:
        return Tokenizer.from_pretrained(tokenizer)
    for cand in (p.parent / p.stem, p.parent):
        if (cand / "tokenizer.json").exists() or (cand / "vocab.txt").exists():
            return Tokenizer.from_pretrained(cand)
    try:
        from transformers import BertTokenizer

        hf = BertTokenizer.from_pretrained("bert-base-uncased")
    except Exception:  # noqa: BLE001 - no network, no cache, a broken cache: the same way out
        hf = None
    if hf is None or len(hf) <= len(SPECIALS):
        raise InputError(
            f"tokenizer: {p} carries no vocabulary (no vocab.txt or tokenizer.json beside it) and bert-base-uncased "
            f"is not available (no network and not in the Hugging Face cache). Pass tokenizer DIR (a directory with "
            f"vocab.txt or tokenizer.json: the one the model was trained with), or put vocab.txt beside the .pth",
            param="tokenizer",
        )
    return Tokenizer(hf)


PTH_TASKS = ("auto", "caption", "itm", "retrieval", "pretrain")
ORIGINAL_QUEUE_SIZE = 57600
"""queue_size of the original retrieval and pre-training configs: their loaders drop a queue of another shape."""


def original_state_dict(
    model: BLIP, task: str = "auto", queue_size: int = ORIGINAL_QUEUE_SIZE, seed: int = 0
) -> tuple[dict[str, torch.Tensor], str]:
    """The model's weights under the full key list of the original code's model for `task`, so that its loaders
    (which assert no missing keys, or load strictly when resuming pre-training) accept them:

    - caption  = models.blip.BLIP_Decoder: visual_encoder, text_decoder
    - itm      = models.blip_itm.BLIP_ITM: visual_encoder, text_encoder, vision_proj, text_proj, itm_head
    - retrieval = models.blip_retrieval.BLIP_Retrieval: itm + temp, the momentum copies (*_m), image_queue,
      text_queue (embed_dim, queue_size), idx_queue, ptr_queue
    - pretrain = models.blip_pretrain.BLIP_Pretrain: retrieval's without idx_queue/ptr_queue, + queue_ptr and
      the text_decoder
    - auto: pretrain for a model with both text towers, caption for a captioner, retrieval for a filter

    Besides the weights, the original lists buffers and aliases a blipctl model does not keep: every text
    tower's `embeddings.position_ids` (0..max_positions-1), the LM head's `decoder.bias` (the same tensor as
    `cls.predictions.bias`). The momentum copies are the online weights (the original's copy_params() at the
    start of training); the queues are random unit vectors (seeded), as the original initialises them.
    Returns (state dict, task).
    """
    c = model.config
    if task == "auto":
        task = "pretrain" if c.text_encoder and c.text_decoder else "caption" if c.text_decoder else "retrieval"
    if task not in PTH_TASKS:
        raise InputError(f"task must be one of {', '.join(PTH_TASKS)}, not {task!r}")
    if task in ("caption", "pretrain") and not c.text_decoder:
        raise InputError(f"task {task!r} needs a model with a text decoder (this one is a retrieval/filter model)")
    if task != "caption" and not c.text_encoder:
        raise InputError(f"task {task!r} needs a model with a text encoder (this one is a captioner)")
    enc = ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head.")
    keep = {
        "caption": ("visual_encoder.", "text_decoder."),
        "itm": enc,
        "retrieval": (*enc, "temp"),
        "pretrain": (*enc, "temp", "text_decoder."),
    }[task]
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items() if k.startswith(keep) and not v.is_meta}
    sd.update({k: v for k, v in model.state_dict().items() if k.startswith(keep) and v.is_meta})  # shapes only
    position_ids = torch.arange(c.text.max_positions).unsqueeze(0)  # (1, max_positions), the original's buffer
    if "text_decoder." in keep:
        sd["text_decoder.bert.embeddings.position_ids"] = position_ids
        sd["text_decoder.cls.predictions.decoder.bias"] = sd["text_decoder.cls.predictions.bias"]
    if "text_encoder." in keep:
        sd["text_encoder.embeddings.position_ids"] = position_ids
    if task in ("retrieval", "pretrain"):
        for k in [k for k in sd if k.startswith(("visual_encoder.", "vision_proj.", "text_encoder.", "text_proj."))]:
            head, rest = k.split(".", 1)
            sd[f"{head}_m.{rest}"] = sd[k]
        g = torch.Generator().manual_seed(seed)
        for name in ("image_queue", "text_queue"):
            sd[name] = torch.nn.functional.normalize(torch.randn(c.embed_dim, queue_size, generator=g), dim=0)
        if task == "retrieval":
            sd["idx_queue"] = torch.full((1, queue_size), -100, dtype=torch.long)
            sd["ptr_queue"] = torch.zeros(1, dtype=torch.long)
        else:
            sd["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return sd, task


def save_pth(model: BLIP, path: str | os.PathLike, task: str = "auto", queue_size: int = ORIGINAL_QUEUE_SIZE) -> str:
    """Export in the original format, `{"model": state_dict}`, loadable by the original code's loaders for `task`
    (see original_state_dict); blipctl's own config rides along under `blipctl_config`. Returns the task."""
    if Path(path).is_dir():
        raise InputError(f"out: {path} is a directory; the pth format needs a .pth file path (e.g. {path}/model.pth)")
    check_blip_shaped(model, "the original .pth format")
    sd, task = original_state_dict(model, task, queue_size)
    atomic_torch_save({"model": sd, "blipctl_config": model.config.to_dict()}, Path(path))
    return task


def check_blip_shaped(model: BLIP, target: str) -> None:
    """Refuse a model whose shape `target` cannot express, rather than write weights it would load wrongly."""
    if model.config.vision.stem != "none":
        raise InputError(
            f"this model's vision tower has a {model.config.vision.stem!r} stem (vision.stem in its config.json), and "
            f"{target} has no place for one: its image embedding is a single patch convolution, so the stem's weights "
            "would be dropped or misread. Keep it in blipctl format (--format blipctl)"
        )


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ---- Hugging Face ------------------------------------------------------------------------------------------------
HF_VISION_KEYS = [
    # (native, Hugging Face) vision-tower names; "{n}" is a block number, "{i}" a norm index; a name ending in "."
    # is a prefix, any other a whole key. Text towers and heads have the same names on both sides.
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.norm.", "vision_model.post_layernorm."),
    ("visual_encoder.blocks.{n}.attn.qkv.", "vision_model.encoder.layers.{n}.self_attn.qkv."),
    ("visual_encoder.blocks.{n}.attn.proj.", "vision_model.encoder.layers.{n}.self_attn.projection."),
    ("visual_encoder.blocks.{n}.norm{i}.", "vision_model.encoder.layers.{n}.layer_norm{i}."),
    ("visual_encoder.blocks.{n}.mlp.", "vision_model.encoder.layers.{n}.mlp."),
]


def _key_rule(src: str, dst: str) -> tuple[str, str]:
    """One HF_VISION_KEYS entry as (regex on `src`, replacement giving `dst`)."""
    pattern = re.escape(src).replace(r"\{n\}", r"(\d+)").replace(r"\{i\}", r"(\d)")
    return "^" + pattern + ("" if src.endswith(".") else "$"), dst.replace("{n}", r"\1").replace("{i}", r"\2")


_HF_TO_NATIVE = [_key_rule(hf, native) for native, hf in HF_VISION_KEYS]
_NATIVE_TO_HF = [_key_rule(native, hf) for native, hf in HF_VISION_KEYS]


def hf_to_native_key(k: str) -> str | None:
    for pat, rep in _HF_TO_NATIVE:
        if re.match(pat, k):
            return re.sub(pat, rep, k)
    if k.startswith(("text_encoder.", "text_decoder.", "vision_proj.", "text_proj.", "itm_head.")):
        return None if k.endswith("cls.predictions.decoder.bias") else k
    return None


def native_to_hf_key(k: str) -> str:
    for pat, rep in _NATIVE_TO_HF:
        if re.match(pat, k):
            return re.sub(pat, rep, k)
    return k


def _read_json(p: Path) -> dict:
    """A JSON object from a file; invalid JSON, another type or an unreadable file is an InputError naming it."""
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, nested too deeply
        raise InputError(f"{p}: invalid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    except OSError as e:
        raise InputError(f"{p}: cannot read ({e.strerror or e})") from None
    if not isinstance(d, dict):
        raise InputError(f"{p}: expected a JSON object, got {type(d).__name__}")
    return d


def _read_hf_weights(p: Path) -> dict[str, torch.Tensor]:
    if (p / "model.safetensors").exists():
        return read_safetensors(p / "model.safetensors")
    index = p / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise InputError(f"{index}: no 'weight_map' of tensor name -> file")
        sd = {}
        for f in sorted(set(weight_map.values())):
            if Path(f).name != f:
                raise InputError(f"{index}: weight file {f!r} is not a file name in {p}")
            sd.update(read_safetensors(p / f))
        return sd
    if (p / "pytorch_model.bin").exists():
        return read_pth(p / "pytorch_model.bin")
    raise InputError(f"{p}: no model.safetensors or pytorch_model.bin")


def _load_hf(p: Path) -> tuple[BLIP, Tokenizer]:
    hf = _read_json(p / "config.json")
    arch = (hf.get("architectures") or ["BlipForConditionalGeneration"])[0]
    layouts = {
        "BlipForConditionalGeneration": (False, True),
        "BlipForImageTextRetrieval": (True, False),
        "BlipForQuestionAnswering": (True, True),
    }
    if arch not in layouts:
        raise InputError(f"{p}: unsupported architecture {arch} (supported: {', '.join(layouts)})")
    has_enc, has_dec = layouts[arch]
    tc, vc = hf.get("text_config", {}), hf.get("vision_config", {})
    d = BlipConfig()
    vision = VisionConfig(
        image_size=vc.get("image_size", 384),
        patch_size=vc.get("patch_size", 16),
        width=vc.get("hidden_size", 768),
        depth=vc.get("num_hidden_layers", 12),
        heads=vc.get("num_attention_heads", 12),
        mlp_dim=vc.get("intermediate_size", 3072),
        layer_norm_eps=vc.get("layer_norm_eps", 1e-5),
    )
    text = TextConfig(
        vocab_size=tc.get("vocab_size", 30524),
        hidden=tc.get("hidden_size", 768),
        layers=tc.get("num_hidden_layers", 12),
        heads=tc.get("num_attention_heads", 8),
        mlp_dim=tc.get("intermediate_size", 3072),
        max_positions=tc.get("max_position_embeddings", 512),
        layer_norm_eps=tc.get("layer_norm_eps", 1e-12),
    )
    for act in (tc.get("hidden_act", "gelu"), vc.get("hidden_act", "gelu")):
        if act != "gelu":
            raise InputError(f"{p}: hidden_act {act!r} is not supported (BLIP uses gelu)")
    tok = Tokenizer.from_pretrained(p)
    sd = {}
    for k, v in _read_hf_weights(p).items():
        nk = hf_to_native_key(k)
        if nk is not None:
            sd[nk] = v
    # transformers ties the head unless tie_word_embeddings is false (top level or text_config); a head that differs
    # from the embeddings is kept as it is either way
    hf_untied = hf.get("tie_word_embeddings") is False or tc.get("tie_word_embeddings") is False
    cfg = BlipConfig(
        vision=vision,
        text=text,
        embed_dim=hf.get("image_text_hidden_size", 256),
        text_encoder=has_enc,
        text_decoder=has_dec,
        share_text=False,
        pad_token_id=tc.get("pad_token_id", d.pad_token_id),
        sep_token_id=tc.get("sep_token_id", d.sep_token_id),
        bos_token_id=tc.get("bos_token_id", d.bos_token_id),
        cls_token_id=tok.cls_id,
        enc_token_id=tok.enc_id,
        tie_lm_head=not (has_dec and (hf_untied or lm_head_untied(sd))),
    )
    model = BLIP(cfg)
    load_weights(model, sd, str(p))
    return model, tok


def export_hf(
    model: BLIP, tokenizer: Tokenizer, out_dir: str | os.PathLike, task: str = "auto", overwrite: bool = False
) -> tuple[Path, str]:
    """Write a directory that transformers' BlipForConditionalGeneration / BlipForImageTextRetrieval loads.

    An existing non-empty directory must be an earlier export (or `overwrite` given); its other files are kept."""
    from safetensors.torch import save_file
    from transformers import BlipConfig as HFBlipConfig

    c = model.config
    check_blip_shaped(model, "Hugging Face BLIP")
    if task == "auto":
        task = "caption" if c.text_decoder else "retrieval"
    if task == "caption" and not c.text_decoder:
        raise InputError(
            "task caption needs a model with a text decoder (this one is a retrieval/filter model)", param="task"
        )
    if task == "retrieval" and not c.text_encoder:
        raise InputError("task retrieval needs a model with a text encoder (this one is a captioner)", param="task")
    if task not in ("caption", "retrieval"):
        raise InputError(f"task must be auto, caption or retrieval, not {task!r}", param="task")
    check_output_dir(out_dir, "hf-export", overwrite)
    arch = "BlipForConditionalGeneration" if task == "caption" else "BlipForImageTextRetrieval"
    v, t = c.vision, c.text
    hf_cfg = HFBlipConfig(
        text_config=dict(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden,
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            intermediate_size=t.mlp_dim,
            max_position_embeddings=t.max_positions,
            layer_norm_eps=t.layer_norm_eps,
            bos_token_id=c.bos_token_id,
            pad_token_id=c.pad_token_id,
            sep_token_id=c.sep_token_id,
            eos_token_id=c.sep_token_id,
        ),
        vision_config=dict(
            hidden_size=v.width,
            num_hidden_layers=v.depth,
            num_attention_heads=v.heads,
            intermediate_size=v.mlp_dim,
            image_size=v.image_size,
            patch_size=v.patch_size,
            layer_norm_eps=v.layer_norm_eps,
        ),
        image_text_hidden_size=c.embed_dim,
        tie_word_embeddings=c.tie_lm_head,
    )
    hf_cfg.text_config.tie_word_embeddings = c.tie_lm_head
    hf_cfg.architectures = [arch]
    keep = (
        ("visual_encoder.", "text_decoder.")
        if task == "caption"
        else ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head.")
    )
    sd = {}
    for k, val in model.state_dict().items():
        if k.startswith(keep):
            sd[native_to_hf_key(k)] = val.detach().cpu().clone().contiguous()
    if task == "caption" and c.tie_lm_head:
        sd.pop(LM_HEAD, None)  # tied to the word embeddings in HF too
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        hf_cfg.save_pretrained(str(tmp))
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp)
        from blip.data.transforms import CLIP_MEAN, CLIP_STD

        pre = {
            "image_processor_type": "BlipImageProcessor",
            "processor_class": "BlipProcessor",
            "do_resize": True,
            "size": {"height": v.image_size, "width": v.image_size},
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
            "do_convert_rgb": True,
        }
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
        mark(tmp, "hf-export")
        umask_modes(tmp)
        install_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, arch


def resize_image(model: BLIP, image_size: int) -> BLIP:
    """Rebuild the model for another image size, interpolating the position embeddings (e.g. 224 -> 384)."""
    import dataclasses

    cfg = dataclasses.replace(model.config, vision=dataclasses.replace(model.config.vision, image_size=image_size))
    new = BLIP(cfg)
    load_weights(new, unique_state_dict(model), "resize")
    return new
