"""Hard negative captions by replacing one word with another of its class (the "replace" negatives of NegCLIP and
SugarCrepe: "a red square left of a blue circle" -> "a red circle left of a blue circle").

In-batch ITM negatives rarely differ from the positive in a single attribute, so a model can match captions to
images from colour alone and never learn which shape has which colour. A swapped caption differs in exactly one
word, so telling it from the true caption needs the attribute, bound to its object.

Classes are given as lists of entries; an entry is one meaning, its synonyms joined by "|":
`[["circle|disc|round", "square|box"], ["left", "right"]]`. A word is replaced by the first synonym of another
entry of its class, never by a synonym of itself (that would be a true caption labelled as a negative).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from blip.errors import InputError


class WordSwapper:
    """caption -> a caption with one class word replaced, or None if it has no word of any class."""

    def __init__(self, classes: Sequence[Sequence[str]], key: str = "word_swaps"):
        self.meaning: dict[str, tuple[int, int]] = {}  # word -> (class, entry)
        self.first: list[list[str]] = []  # class -> entry -> the word written for it
        for c, entries in enumerate(classes):
            if len(entries) < 2:
                raise InputError(f"{key}[{c}]: a class needs at least two entries to swap between, got {entries!r}")
            self.first.append([])
            for e, entry in enumerate(entries):
                words = [w.strip().lower() for w in entry.split("|")]
                if not all(re.fullmatch(r"[\w'-]+", w) for w in words):
                    raise InputError(f"{key}[{c}][{e}]: entries are single words joined by '|', got {entry!r}")
                for w in words:
                    if w in self.meaning:
                        raise InputError(f"{key}[{c}][{e}]: {w!r} is listed twice")
                    self.meaning[w] = (c, e)
                self.first[c].append(words[0])
        self._word = re.compile(r"[\w'-]+")

    def __call__(self, caption: str, rng: random.Random) -> str | None:
        hits = [m for m in self._word.finditer(caption) if m.group().lower() in self.meaning]
        if not hits:
            return None
        m = rng.choice(hits)
        c, e = self.meaning[m.group().lower()]
        other = rng.choice([w for i, w in enumerate(self.first[c]) if i != e])
        return caption[: m.start()] + other + caption[m.end() :]
