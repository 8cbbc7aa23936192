"""Caption cleaning, exactly as the original BLIP (data/utils.py `pre_caption`)."""

from __future__ import annotations

import re

_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Lowercase, replace `.!"()*#:;~` with a space, collapse runs of whitespace, strip, keep `max_words` words.

    A faithful copy of the original, quirks included: a single tab or newline between words survives (only runs of
    two or more whitespace characters collapse), and words are counted by splitting on single spaces.
    The original's default is 50; its datasets (and blipctl) use 30.
    """
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption
