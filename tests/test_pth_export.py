"""`.pth` export for the original salesforce/BLIP code, and LM heads that are not tied to the word embeddings.

The original model's key lists (tests/data/orig_keys_*.txt) were dumped from the original code itself, at base
size; the tests build blipctl models of the same depth (narrow, so they are cheap) and compare full key sets.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from braceexpand import braceexpand
from helpers import hf_model, make_images, sharpen, tiny_tokenizer
from typer.testing import CliRunner

from blip.checkpoint import load_model, original_state_dict, save_checkpoint, save_pth
from blip.config import BlipConfig, TextConfig, VisionConfig, model_config
from blip.errors import InputError
from blip.model import BLIP
from blipctl.cli import app

DATA = Path(__file__).parent / "data"
LM_HEAD = "text_decoder.cls.predictions.decoder.weight"
EMBED = "text_decoder.bert.embeddings.word_embeddings.weight"
runner = CliRunner()

# task -> the text towers of the blipctl model exported as it
TOWERS = {
    "caption": dict(text_encoder=False, text_decoder=True),
    "itm": dict(text_encoder=True, text_decoder=False),
    "retrieval": dict(text_encoder=True, text_decoder=False),
    "pretrain": dict(text_encoder=True, text_decoder=True),
}


def orig_keys(task: str) -> dict[str, tuple[list[int], str]]:
    """key -> (shape, dtype) of the original model, brace ranges expanded."""
    out = {}
    for line in (DATA / f"orig_keys_{task}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        for k in braceexpand(key):
            out[k] = (json.loads(shape), dtype)
    return out


def base_depth_config(task: str, width: int = 32) -> BlipConfig:
    """The base model's depth (ViT 12 blocks, BERT 12 layers) at a tiny width: the same key list, cheap to build."""
    return BlipConfig(
        vision=VisionConfig(image_size=32, patch_size=16, width=width, depth=12, heads=4, mlp_dim=2 * width),
        text=TextConfig(vocab_size=64, hidden=width, layers=12, heads=4, mlp_dim=2 * width, max_positions=512),
        embed_dim=256,
        **TOWERS[task],
    )


@pytest.mark.parametrize("task", ["caption", "itm", "retrieval", "pretrain"])
def test_export_key_set_equals_the_original_models(task):
    want = orig_keys(task)
    assert len(want) == {"caption": 474, "itm": 473, "retrieval": 949, "pretrain": 1272}[task]
    torch.manual_seed(0)
    sd, got_task = original_state_dict(BLIP(base_depth_config(task)), task)
    assert got_task == task
    assert sorted(sd) == sorted(want), (sorted(set(want) - set(sd)), sorted(set(sd) - set(want)))
    for k, v in sd.items():  # dtypes everywhere; exact shapes for what does not depend on the width
        shape, dtype = want[k]
        assert str(v.dtype).removeprefix("torch.") == dtype, k
        assert v.dim() == len(shape), k
        if k.endswith(("position_ids", "_queue", "queue_ptr")) or k == "temp":
            assert list(v.shape) == shape, k


def test_export_buffers_and_aliases_have_the_original_values():
    torch.manual_seed(0)
    m = BLIP(base_depth_config("pretrain"))
    sd, _ = original_state_dict(m, "pretrain", queue_size=96)
    assert torch.equal(sd["text_encoder.embeddings.position_ids"], torch.arange(512)[None])
    assert torch.equal(sd["text_decoder.bert.embeddings.position_ids"], torch.arange(512)[None])
    assert torch.equal(sd["text_decoder.cls.predictions.decoder.bias"], sd["text_decoder.cls.predictions.bias"])
    assert torch.equal(sd["visual_encoder_m.blocks.11.mlp.fc2.weight"], sd["visual_encoder.blocks.11.mlp.fc2.weight"])
    assert torch.equal(sd["text_proj_m.weight"], sd["text_proj.weight"])
    assert sd["image_queue"].shape == (256, 96)
    assert torch.allclose(sd["image_queue"].norm(dim=0), torch.ones(96))  # unit columns, as the original's init
    assert int(sd["queue_ptr"]) == 0
    sd, _ = original_state_dict(BLIP(base_depth_config("retrieval")), "retrieval", queue_size=96)
    assert (sd["idx_queue"] == -100).all() and sd["idx_queue"].shape == (1, 96) and int(sd["ptr_queue"]) == 0


def test_auto_task_and_refusals():
    torch.manual_seed(0)
    cap, filt = BLIP(base_depth_config("caption")), BLIP(base_depth_config("itm"))
    assert original_state_dict(cap)[1] == "caption"
    assert original_state_dict(filt, queue_size=8)[1] == "retrieval"
    with pytest.raises(InputError, match="text encoder"):
        original_state_dict(cap, "itm")
    with pytest.raises(InputError, match="text decoder"):
        original_state_dict(filt, "pretrain")
    with pytest.raises(InputError, match="task must be"):
        original_state_dict(cap, "vqa")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["caption", "retrieval", "pretrain"])
def test_export_shapes_equal_the_original_at_base_size(task):
    """Full shapes too, with the real base model (caption/retrieval at 384 px as released, pretrain at 224)."""
    cfg = model_config("base", image_size=224 if task == "pretrain" else 384, **TOWERS[task])
    with torch.device("meta"):  # shapes only: no memory, no init time
        m = BLIP(cfg)
    sd, _ = original_state_dict(m, task)
    want = {k: s for k, (s, _) in orig_keys(task).items()}
    if task == "pretrain":
        # an artifact of dumping under transformers 5: BLIP_Pretrain builds its decoder with bert_config.json's
        # 30522 tokens and resizes it to 30524; 5.x no longer aliases cls.predictions.bias to decoder.bias, so only
        # the latter grows. Under the transformers 4.15 the original targets, both are the same [30524] tensor.
        assert want["text_decoder.cls.predictions.bias"] == [30522]
        want["text_decoder.cls.predictions.bias"] = [30524]
    assert {k: list(v.shape) for k, v in sd.items()} == want


# ---- round trips through blipctl -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("img"), n=2, size=40)


def micro(tok, **kw) -> BlipConfig:
    return BlipConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64),
        text=TextConfig(vocab_size=len(tok), hidden=32, layers=2, heads=4, mlp_dim=64, max_positions=64),
        embed_dim=16,
        bos_token_id=tok.bos_id,
        enc_token_id=tok.enc_id,
        pad_token_id=tok.pad_id,
        cls_token_id=tok.cls_id,
        sep_token_id=tok.sep_id,
        **kw,
    )


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def captions(r) -> list[str]:
    assert r.exit_code == 0, r.output
    return [json.loads(x)["caption"] for x in r.stdout.splitlines()]


@pytest.mark.parametrize("task", ["caption", "itm", "retrieval", "pretrain"])
def test_every_export_task_loads_back_with_the_same_weights(tok, tmp_path, task):
    torch.manual_seed(0)
    m = BLIP(micro(tok, **TOWERS[task]))
    sharpen(m)
    d = tmp_path / "ckpt"
    save_checkpoint(m, tok, d)
    pth = tmp_path / "m.pth"
    r = cli("export", "--model", d, "--format", "pth", "--task", task, "--out", pth)
    assert r.exit_code == 0, r.output
    back = load_model(pth, tokenizer=str(d)).model
    want = m.state_dict()
    got = back.state_dict()
    if task == "itm":  # blip_itm has no ITC temperature: the default comes back
        want = {k: v for k, v in want.items() if k != "temp"}
        got.pop("temp")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ---- LM heads: tied, untied ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untied_captioner(tok):
    """A captioner whose head is NOT its word-embedding matrix (as the original code under transformers 5 trains)."""
    torch.manual_seed(1)
    m = BLIP(micro(tok, text_encoder=False, tie_lm_head=False))
    sharpen(m)
    with torch.no_grad():
        m.text_decoder.cls.predictions.decoder.weight.normal_(0, 0.5)
    return m


def test_untied_model_keeps_a_separate_head_matrix(untied_captioner, tok):
    def head_is_embedding(m: BLIP) -> bool:
        return m.text_decoder.cls.predictions.decoder.weight is m.text_decoder.bert.embeddings.word_embeddings.weight

    assert not head_is_embedding(untied_captioner)
    torch.manual_seed(0)
    assert head_is_embedding(BLIP(micro(tok, text_encoder=False)))
    shared = BLIP(micro(tok, tie_lm_head=False))  # shared towers, untied head
    assert not head_is_embedding(shared)
    assert shared.text_decoder.cls.predictions.decoder.weight is not (
        shared.text_encoder.embeddings.word_embeddings.weight
    )


def _same_outputs(a: BLIP, b: BLIP, tok) -> None:
    ids, mask = tok(["a red circle on the left", "a big star"])
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(a.lm_logits(ids, mask, a.encode_image(px)), b.lm_logits(ids, mask, b.encode_image(px)))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_pth_head_loads_as_it_was_written(untied_captioner, tok, tmp_path, images, tied):
    """An original-layout .pth: a tied head loads tied; an untied one loads untied (tie_lm_head false), and
    captions exactly as the model that wrote it."""
    torch.manual_seed(1)
    m = BLIP(micro(tok, text_encoder=False)) if tied else untied_captioner
    if tied:
        sharpen(m)
    pth = tmp_path / "cap.pth"
    save_pth(m, pth)
    sd = torch.load(pth, weights_only=True)["model"]
    assert torch.equal(sd[LM_HEAD], sd[EMBED]) == tied
    tok.save(tmp_path)
    back = load_model(pth).model
    assert back.config.tie_lm_head == tied
    head, emb = back.text_decoder.cls.predictions.decoder.weight, back.text_decoder.bert.embeddings.word_embeddings
    assert (head is emb.weight) == tied
    _same_outputs(m, back, tok)
    d = tmp_path / "native"
    save_checkpoint(m, tok, d)
    assert captions(cli("caption", *images, "--model", pth, "--json")) == captions(
        cli("caption", *images, "--model", d, "--json")
    )


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hf_head_loads_as_it_was_written(untied_captioner, tok, tmp_path, images, tied):
    """HF directories: ours exported (tie_word_embeddings follows the model) and transformers' own, both ways."""
    from transformers import BlipForConditionalGeneration

    m = untied_captioner
    if tied:
        torch.manual_seed(1)
        m = BLIP(micro(tok, text_encoder=False))
        sharpen(m)
    out = tmp_path / "hf"
    assert cli("export", "--model", _native(m, tok, tmp_path), "--format", "hf", "--out", out).exit_code == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == tied
    hf = BlipForConditionalGeneration.from_pretrained(out).eval()
    hf_head = hf.text_decoder.cls.predictions.decoder.weight
    assert torch.equal(hf_head, m.text_decoder.cls.predictions.decoder.weight.detach())
    back = load_model(out).model
    assert back.config.tie_lm_head == tied
    _same_outputs(m, back, tok)

    # transformers' own checkpoint, untied by its config
    ref_dir = tmp_path / "hf_ref"
    ref = hf_model("caption", tok, ref_dir, seed=3)
    if not tied:
        ref.config.tie_word_embeddings = False
        ref.config.text_config.tie_word_embeddings = False
        ref = BlipForConditionalGeneration(ref.config)
        sharpen(ref, seed=3)
        dec = ref.text_decoder
        assert dec.cls.predictions.decoder.weight is not dec.bert.embeddings.word_embeddings.weight
        ref.save_pretrained(ref_dir)
    got = load_model(ref_dir).model
    assert got.config.tie_lm_head == tied
    with torch.no_grad():
        assert torch.equal(*(x.text_decoder.cls.predictions.decoder.weight for x in (got, ref)))


def _native(m: BLIP, tok, tmp_path: Path) -> Path:
    d = tmp_path / "native"
    save_checkpoint(m, tok, d)
    return d


def test_a_tied_config_refuses_an_untied_head(untied_captioner, tok, tmp_path):
    """Never tie silently: native weights whose head differs, under a config that ties it, are refused."""
    d = _native(untied_captioner, tok, tmp_path)
    meta = json.loads((d / "config.json").read_text())
    assert meta["model"]["tie_lm_head"] is False
    assert load_model(d).model.config.tie_lm_head is False
    meta["model"]["tie_lm_head"] = True
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="tie_lm_head"):
        load_model(d)
    r = cli("caption", *make_images(tmp_path / "i", n=1), "--model", d)
    assert r.exit_code == 2 and "LM head" in r.output


def test_the_bias_the_original_forward_adds_wins(tok, tmp_path):
    """The original's LM head adds `decoder.bias`; BLIP_Pretrain under transformers 5 saves a stale, shorter
    `cls.predictions.bias` beside it (only decoder.bias is resized). Loading takes decoder.bias."""
    torch.manual_seed(0)
    m = BLIP(micro(tok, text_encoder=False))
    with torch.no_grad():
        m.text_decoder.cls.predictions.bias.normal_()
    sd, _ = original_state_dict(m)
    sd["text_decoder.cls.predictions.bias"] = torch.zeros(len(tok) - 2)
    torch.save({"model": sd}, tmp_path / "m.pth")
    tok.save(tmp_path)
    back = load_model(tmp_path / "m.pth").model
    assert torch.equal(back.text_decoder.cls.predictions.bias, m.text_decoder.cls.predictions.bias)


def test_untied_flag_survives_dataclass_replace(tok):
    cfg = dataclasses.replace(micro(tok), tie_lm_head=False)
    assert BlipConfig.from_dict(cfg.to_dict()).tie_lm_head is False
