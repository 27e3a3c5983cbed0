"""Prompt builder: one task sentence, 3 example pairs drawn (seeded) from one meta pool, the caption.

The examples and the caption use the same "Input: ... / Output: ..." lines, so the model continues the
pattern with one line; generation stops at the newline. For chat models the same text is the user turn.
"""
from __future__ import annotations

import random

from .pools import Pool

TASK = "Rewrite the image caption below in a different way, keeping its meaning. Answer with one line."
NUM_EXAMPLES = 3
MAX_CAPTION_CHARS = 300  # keeps prompt + answer well inside a small model's context


def clean_caption(caption: str, max_chars: int = MAX_CAPTION_CHARS) -> str:
    """Newlines and runs of spaces collapsed; cut at a word boundary to at most max_chars."""
    text = " ".join(caption.split())
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0] or text[:max_chars]
    return text


def draw_examples(pool: Pool, seed: int, key: str, k: int = NUM_EXAMPLES) -> list[tuple[str, str]]:
    """k distinct pairs, a function of (seed, pool, key) only: the same caption gets the same examples
    however the work is sharded or resumed. (random.Random seeds strings with SHA-512: stable.)"""
    rng = random.Random(f"{seed}:{pool.name}:{key}")
    return rng.sample(pool.pairs, k)


def build_prompt(caption: str, examples: list[tuple[str, str]]) -> str:
    lines = [TASK, ""]
    for src, dst in examples:
        lines += [f"Input: {src}", f"Output: {dst}", ""]
    lines += [f"Input: {clean_caption(caption)}", "Output:"]
    return "\n".join(lines)
