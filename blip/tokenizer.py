"""WordPiece tokenizer with BLIP's conventions: BERT uncased, plus [DEC] (bos, decoder start) and [ENC].

Beware transformers 5: `BertTokenizer(vocab_file=...)` silently ignores the file and gives a 5-token vocab,
so vocab files are loaded with `from_pretrained` (a directory or the vocab file path) and the result is checked.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from blip.errors import InputError

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class Tokenizer:
    """A thin wrapper over a transformers BERT tokenizer that knows BLIP's special tokens."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self._ensure_blip_tokens()
        self.pad_id = self.hf.pad_token_id
        self.cls_id = self.hf.cls_token_id
        self.sep_id = self.hf.sep_token_id
        self.bos_id = self.hf.convert_tokens_to_ids("[DEC]")
        self.enc_id = self.hf.convert_tokens_to_ids("[ENC]")

    def _ensure_blip_tokens(self) -> None:
        unk = self.hf.unk_token_id
        if self.hf.convert_tokens_to_ids("[DEC]") in (None, unk):
            self.hf.add_special_tokens({"bos_token": "[DEC]"})
        elif self.hf.bos_token != "[DEC]":
            self.hf.bos_token = "[DEC]"
        if self.hf.convert_tokens_to_ids("[ENC]") in (None, unk):
            self.hf.add_special_tokens({"additional_special_tokens": ["[ENC]"]})

    def __len__(self) -> int:
        return len(self.hf)

    # ---- loading / saving -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a directory (tokenizer.json or vocab.txt) or a vocab.txt file."""
        from transformers import BertTokenizer

        p = Path(path)
        if not p.exists():
            raise InputError(f"tokenizer not found: {p}")
        if p.is_dir() and not any((p / f).exists() for f in ("tokenizer.json", "vocab.txt")):
            raise InputError(f"no tokenizer files (tokenizer.json or vocab.txt) in {p}")
        hf = BertTokenizer.from_pretrained(str(p))
        if len(hf) <= len(SPECIALS):
            raise InputError(f"tokenizer at {p} has only {len(hf)} tokens: not a usable vocabulary")
        return cls(hf)

    def save(self, out_dir: str | os.PathLike) -> None:
        self.hf.save_pretrained(str(out_dir))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2) -> Tokenizer:
        """An uncased WordPiece vocabulary from captions, for from-scratch runs without BERT.

        Built deterministically: BERT's normaliser and pre-tokeniser split the words; the vocabulary is the
        specials, every character seen (as a word start and as a `##` continuation), then the most frequent whole
        words (ties alphabetical) seen at least `min_frequency` times, up to `vocab_size`. Rarer words are spelled
        from the characters. (The `tokenizers` WordPiece trainer gives a different vocabulary in every process,
        from hash-map order, so the same run gave different models.)
        """
        from tokenizers import normalizers, pre_tokenizers

        normalize, split = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(w for w, _ in split.pre_tokenize_str(normalize.normalize_str(t)))
        starts = sorted({w[0] for w in counts})
        continuations = sorted({"##" + c for w in counts for c in w[1:]})
        words = sorted(
            (w for w, n in counts.items() if n >= min_frequency and len(w) > 1), key=lambda w: (-counts[w], w)
        )
        vocab = SPECIALS + starts + continuations
        return cls.from_vocab(vocab + words[: max(0, vocab_size - len(vocab))])

    @classmethod
    def from_vocab(cls, tokens: Sequence[str]) -> Tokenizer:
        """A tokenizer from a vocabulary list in id order (through a vocab.txt: see the module note)."""
        with tempfile.TemporaryDirectory() as d:
            Path(d, "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
            return cls.from_pretrained(d)

    # ---- encoding / decoding ----------------------------------------------------------------------------------
    def __call__(
        self, texts: Sequence[str], max_length: int = 35, padding: str = "longest"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (ids, mask), each (B, L): [CLS] tokens [SEP], truncated to max_length, padded with [PAD]."""
        enc = self.hf(list(texts), padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def encode_prompt(self, prompt: str) -> list[int]:
        """Decoder start ids for a prompt: [DEC] + prompt tokens (no [SEP]); just [DEC] for an empty prompt."""
        ids = self.hf(prompt, add_special_tokens=True)["input_ids"][:-1]  # drop [SEP]
        ids[0] = self.bos_id
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True).strip()
