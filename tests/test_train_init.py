"""Fresh models: text from a local HF BERT, vision from a timm ViT state dict, a tokenizer trained on captions."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from helpers import synthetic_loader, tiny_tokenizer

from blip.checkpoint import save_checkpoint
from blip.config import model_config
from blip.distributed import DistInfo
from blip.errors import InputError
from blip.init import init_text_from_bert, init_vision_from_timm
from blip.model.blip import BLIP
from blip.tokenizer import Tokenizer
from blip.train import Trainer
from blip.train_config import build_config


def _tiny(tok, image_size=32):
    return BLIP(model_config("tiny", vocab_size=len(tok), image_size=image_size))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BertForMaskedLM (hidden 256 like the `tiny` size, 3 layers) saved offline with its vocab."""
    from transformers import BertConfig, BertForMaskedLM

    tok = tiny_tokenizer()
    d = tmp_path_factory.mktemp("bert")
    vocab = [t for t, _ in sorted(tok.hf.get_vocab().items(), key=lambda kv: kv[1]) if t not in ("[DEC]", "[ENC]")]
    (d / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
    torch.manual_seed(1)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=256, num_hidden_layers=3, num_attention_heads=4, intermediate_size=1024
    )
    BertForMaskedLM(cfg).save_pretrained(d)
    return d


def test_text_init_maps_bert_into_encoder_and_decoder(bert_dir):
    from safetensors.torch import load_file

    bert = {k.removeprefix("bert."): v for k, v in load_file(str(bert_dir / "model.safetensors")).items()}
    tok = tiny_tokenizer()
    model = _tiny(tok)
    ca_before = model.text_encoder.encoder.layer[0].crossattention.self.key.weight.clone()
    loaded = init_text_from_bert(model, bert_dir)
    sd = model.state_dict()
    n = bert["embeddings.word_embeddings.weight"].shape[0]
    assert torch.equal(
        sd["text_encoder.embeddings.word_embeddings.weight"][:n], bert["embeddings.word_embeddings.weight"]
    )
    for i in range(2):  # the model has 2 layers; BERT's third is ignored
        for name in ("attention.self.query.weight", "attention.output.LayerNorm.weight", "intermediate.dense.weight"):
            want = bert[f"encoder.layer.{i}.{name}"]
            assert torch.equal(sd[f"text_encoder.encoder.layer.{i}.{name}"], want)
            assert torch.equal(sd[f"text_decoder.bert.encoder.layer.{i}.{name}"], want)  # decoder SA from BERT too
    assert torch.equal(model.text_encoder.encoder.layer[0].crossattention.self.key.weight, ca_before)  # random
    assert torch.equal(
        sd["text_decoder.cls.predictions.transform.dense.weight"], bert["cls.predictions.transform.dense.weight"]
    )
    assert torch.equal(sd["text_decoder.cls.predictions.bias"][:n], bert["cls.predictions.bias"])
    assert not any("crossattention" in k for k in loaded)


def test_text_init_rejects_a_bert_of_another_width(bert_dir):
    tok = tiny_tokenizer()
    mc = model_config("tiny", vocab_size=len(tok), image_size=32)
    model = BLIP(dataclasses.replace(mc, text=dataclasses.replace(mc.text, hidden=128, heads=2, mlp_dim=256)))
    with pytest.raises(InputError, match="hidden size"):
        init_text_from_bert(model, bert_dir)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_vision_init_from_a_timm_state_dict(tmp_path, fmt):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(2)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=256, depth=2, num_heads=4, num_classes=10)
    path = tmp_path / f"vit.{fmt}"
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    torch.save({"model": sd}, path) if fmt == "pth" else save_file(sd, str(path))
    model = _tiny(tiny_tokenizer(), image_size=32)
    init_vision_from_timm(model, str(path))
    ours = model.visual_encoder.state_dict()
    assert torch.equal(ours["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])
    assert ours["pos_embed"].shape == (1, 5, 256)  # 14x14 patches interpolated to 2x2 (+ CLS)
    assert torch.equal(ours["pos_embed"][:, 0], sd["pos_embed"][:, 0])
    with pytest.raises(InputError, match="no such file"):
        init_vision_from_timm(model, str(tmp_path / "missing.pth"))


def test_fresh_model_tokenizer_from_text_init_or_trained_on_captions(tmp_path, bert_dir):
    base = {
        "model": {"size": "tiny", "image_size": 32, "text_init": str(bert_dir)},
        "data": {"batch_size": 8, "num_samples": 64},
        "train": {"out": str(tmp_path / "o"), "device": "cpu"},
    }
    tr = Trainer(build_config("pretrain", base), DistInfo(), None, synthetic_loader(8))
    model, tok = tr.build_model(None)
    assert tok.hf.convert_ids_to_tokens(tok.bos_id) == "[DEC]" and model.config.text.vocab_size == len(tok)
    assert (model.config.bos_token_id, model.config.enc_token_id) == (tok.bos_id, tok.enc_id)

    base["model"] = {"size": "tiny", "image_size": 32, "tokenizer_vocab": 60}
    tr = Trainer(build_config("pretrain", base), DistInfo(), None, synthetic_loader(8))
    model, tok = tr.build_model(None)
    assert tok(["red top"])[0].shape[1] == 4  # [CLS] red top [SEP]: words of the captions are whole tokens
    assert model.config.text.vocab_size == len(tok) <= 62


VOCAB_SCRIPT = """
import sys
from blip.tokenizer import Tokenizer
captions = ["a red circle on the left", "a blue square at the top", "img_0423.jpg", "the red box"] * 3 + ["a zebra"]
tok = Tokenizer.train(captions, vocab_size=int(sys.argv[1]))
sys.stdout.write("\\n".join(tok.hf.convert_ids_to_tokens(list(range(len(tok))))))
"""


def test_trained_vocabulary_is_the_same_in_every_process(tmp_path):
    # the tokenizers WordPiece trainer gave a different vocabulary per process (hash-map order): the same recipe
    # then trained different models on different runs and machines
    (tmp_path / "v.py").write_text(VOCAB_SCRIPT)
    runs = [
        subprocess.run(
            [sys.executable, str(tmp_path / "v.py"), "48"], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.split("\n")
        for seed in ("1", "2")
    ]  # fmt: skip
    assert runs[0] == runs[1]
    vocab = runs[0]
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and vocab[-2:] == ["[DEC]", "[ENC]"]
    words = [t for t in vocab[5:-2] if len(t) > 1 and not t.startswith("##")]
    assert words[:4] == ["the", "red", "0423", "at"]  # most frequent first (9, 6, then 3 each, alphabetical)
    assert "zebra" not in words  # seen once: spelled from characters
    tok = Tokenizer.train(["a red circle on the left", "a blue square at the top"] * 3 + ["a zebra"])
    assert tok.hf.tokenize("a zebra on the left") == ["a", "z", "##e", "##b", "##r", "##a", "on", "the", "left"]


def test_patch_size_for_fresh_models(tmp_path):
    base = {"model": {"size": "tiny", "image_size": 32, "tokenizer_vocab": 60, "patch_size": 8}}
    base |= {"data": {"batch_size": 8, "num_samples": 64}, "train": {"out": str(tmp_path / "o"), "device": "cpu"}}
    model, tok = Trainer(build_config("pretrain", base), DistInfo(), None, synthetic_loader(8)).build_model(None)
    assert model.config.vision.patch_size == 8 and model.config.vision.num_patches == 16
    assert model.encode_image(torch.zeros(2, 3, 32, 32)).shape == (2, 17, 256)  # (B, 1 + 4x4 patches, D)
    with pytest.raises(InputError, match=r"model.patch_size: must divide model.image_size \(32\), got 12"):
        build_config("pretrain", {**base, "model": {**base["model"], "patch_size": 12}})
    save_checkpoint(model, tok, tmp_path / "p8")
    ft = {**base, "model": {"init": str(tmp_path / "p8"), "image_size": 32, "patch_size": 16}}
    with pytest.raises(InputError, match="model.patch_size: 16, but model.init .*p8 has patches of 8"):
        Trainer(build_config("filter", ft), DistInfo(), None, synthetic_loader(8)).build_model(None)


def test_finetunes_need_an_init(tmp_path):
    cfg = build_config("captioner", {"train": {"out": str(tmp_path)}, "data": {"train": ["x"]}})
    with pytest.raises(InputError, match="model.init"):
        Trainer(cfg, DistInfo(), None, None).build_model(None)


def test_conv_stem_for_fresh_models_is_inherited_by_fine_tunes(tmp_path):
    base = {"model": {"size": "tiny", "image_size": 32, "tokenizer_vocab": 60, "stem": "conv"}}
    base |= {"data": {"batch_size": 8, "num_samples": 64}, "train": {"out": str(tmp_path / "o"), "device": "cpu"}}
    model, tok = Trainer(build_config("pretrain", base), DistInfo(), None, synthetic_loader(8)).build_model(None)
    assert model.config.vision.stem == "conv"
    assert isinstance(model.visual_encoder.patch_embed.proj, torch.nn.Sequential)
    assert model.encode_image(torch.zeros(2, 3, 32, 32)).shape == (2, 5, 256)  # (B, 1 + 2x2 patches, D)
    with pytest.raises(InputError, match="model.stem"):
        build_config("pretrain", {**base, "model": {**base["model"], "stem": "resnet"}})
    save_checkpoint(model, tok, tmp_path / "stem")
    ft = {**base, "model": {"init": str(tmp_path / "stem"), "image_size": 32}}
    derived, _ = Trainer(build_config("captioner", ft), DistInfo(), None, synthetic_loader(8)).build_model(None)
    assert derived.config.vision.stem == "conv"  # the fine-tune keeps the stem and its weights
    w = "visual_encoder.patch_embed.proj.0.weight"
    assert torch.equal(derived.state_dict()[w], model.state_dict()[w])
    ft["model"]["stem"] = "none"
    with pytest.raises(InputError, match="model.stem: 'none', but (--init|model.init) .*stem has stem 'conv'"):
        Trainer(build_config("filter", ft), DistInfo(), None, synthetic_loader(8)).build_model(None)
