"""Load the ORIGINAL salesforce/BLIP pre-training model (models/blip_pretrain.py) from an export, for side-by-side
timing. Nothing of the original is copied here: it is imported from `orig_dir`, unmodified.

    git --git-dir=<mirror of github.com/salesforce/BLIP> archive HEAD models configs | tar -x -C /tmp/orig_blip

The original targets transformers 4.15 / timm 0.4.12. Under transformers 5 / timm 1.0 it needs the small
compatibility shims below (monkeypatches applied in this process only; each is listed in the returned `shims`),
the same as the project's anchor measurement uses: missing helpers re-exported or stubbed, `from_pretrained` of
bert-base-uncased replaced by a random init of the same shape (offline), no DeiT download, a local vocabulary,
no torch.distributed gather (one process).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import types

import torch

TINY = {"vit_depth": 2, "vit_width": 256, "vit_heads": 4, "layers": 2, "hidden": 256, "heads": 4, "mlp": 1024}
"""blipctl's `tiny` size (blip.config.model_config), expressed in the original's terms."""


def synthetic_vocab(path: str, size: int = 30522) -> str:
    """A bert-base-sized vocabulary file (ids are what matter for timing)."""
    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"w{i}" for i in range(size - len(specials))]
    with open(path, "w") as f:
        f.write("\n".join(specials + words) + "\n")
    return path


def _import_shims(shims: list[str]) -> None:
    import transformers.modeling_utils as mu

    try:
        import fairscale.nn.checkpoint.checkpoint_activations  # noqa: F401
    except ImportError:
        stub = "fairscale.nn.checkpoint.checkpoint_activations"
        for n in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint", stub):
            sys.modules.setdefault(n, types.ModuleType(n))

        def checkpoint_wrapper(module, *a, **k):
            raise RuntimeError("fairscale stub: vit_grad_ckpt is off in this benchmark")

        sys.modules["fairscale.nn.checkpoint.checkpoint_activations"].checkpoint_wrapper = checkpoint_wrapper
        shims.append("fairscale missing: stub checkpoint_wrapper (only used with vit_grad_ckpt, off)")
    helpers = ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer")
    missing = [n for n in helpers if not hasattr(mu, n)]
    if missing:
        import transformers.pytorch_utils as pu

        for n in missing:
            if hasattr(pu, n):
                setattr(mu, n, getattr(pu, n))
            else:

                def unsupported(*a, _n=n, **k):
                    raise NotImplementedError(f"{_n} was removed from transformers (only prune_heads uses it)")

                setattr(mu, n, unsupported)
        shims.append(f"transformers 5 moved {', '.join(missing)}: re-exported from pytorch_utils or stubbed")


def _model_shims(shims: list[str], tok, size: str):
    import models.blip_pretrain as bp
    import models.med as med

    P = med.BertPreTrainedModel
    if "all_tied_weights_keys" in getattr(P.post_init, "__code__", P.post_init).co_names:
        hf_init = P.init_weights

        def init_weights(self):  # med.py calls init_weights() (4.x); 5.x needs post_init() to have run first
            if "all_tied_weights_keys" not in self.__dict__:
                self.post_init()
            else:
                hf_init(self)

        P.init_weights = init_weights
        shims.append("transformers 5: init_weights() runs post_init() first")
    if not hasattr(P, "invert_attention_mask"):

        def invert_attention_mask(self, m):
            m = m[:, None, :, :] if m.dim() == 3 else m[:, None, None, :]
            m = m.to(dtype=self.dtype)
            return (1.0 - m) * torch.finfo(self.dtype).min

        P.invert_attention_mask = invert_attention_mask
        shims.append("transformers 5 removed invert_attention_mask: re-added with the 4.x semantics")
    if not hasattr(P, "get_head_mask"):
        P.get_head_mask = lambda self, head_mask, n, is_attention_chunked=False: [None] * n
        shims.append("transformers 5 removed get_head_mask: re-added for head_mask=None")

    def random_init(cls, name, *a, config=None, **kw):
        return cls(config, **kw)

    med.BertModel.from_pretrained = classmethod(random_init)
    med.BertLMHeadModel.from_pretrained = classmethod(random_init)
    torch.hub.load_state_dict_from_url = lambda *a, **k: {"model": {}}
    bp.init_tokenizer = lambda: tok
    bp.concat_all_gather = lambda t: t
    shims.append(
        "offline, one process: BERT from_pretrained -> random init of the same config; no DeiT download; "
        "local vocab tokenizer; concat_all_gather -> identity"
    )
    if size == "tiny":
        from models.vit import VisionTransformer

        def create_vit_tiny(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
            vit_ = VisionTransformer(
                img_size=image_size,
                patch_size=16,
                embed_dim=TINY["vit_width"],
                depth=TINY["vit_depth"],
                num_heads=TINY["vit_heads"],
                drop_path_rate=drop_path_rate,
            )
            return vit_, TINY["vit_width"]

        bp.create_vit = create_vit_tiny
        shims.append("tiny: create_vit -> the original VisionTransformer at blipctl's tiny size; med config likewise")
    return bp


def load_original(orig_dir: str, size: str, image_size: int, queue_size: int) -> tuple[torch.nn.Module, object, list]:
    """(BLIP_Pretrain in train mode, its tokenizer, the shims applied)."""
    if not os.path.isfile(os.path.join(orig_dir, "models", "blip_pretrain.py")):
        raise SystemExit(f"--original {orig_dir}: no models/blip_pretrain.py (an export of salesforce/BLIP)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, os.path.abspath(orig_dir))
    shims: list[str] = []
    _import_shims(shims)
    import transformers
    from transformers import BertTokenizer

    transformers.logging.set_verbosity_error()
    tmp = tempfile.mkdtemp(prefix="orig_blip_")
    tok = BertTokenizer.from_pretrained(synthetic_vocab(os.path.join(tmp, "vocab.txt")))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    bp = _model_shims(shims, tok, size)
    cfg_path = os.path.join(orig_dir, "configs", "bert_config.json")
    if size == "tiny":
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg.update(
            num_hidden_layers=TINY["layers"],
            hidden_size=TINY["hidden"],
            num_attention_heads=TINY["heads"],
            intermediate_size=TINY["mlp"],
            encoder_width=TINY["vit_width"],
        )
        cfg_path = os.path.join(tmp, "bert_config_tiny.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
    with contextlib.redirect_stdout(io.StringIO()):  # the original prints every tied module
        model = bp.BLIP_Pretrain(med_config=cfg_path, image_size=image_size, vit="base", queue_size=queue_size)
    return model.train(), tok, shims
