"""Output filter: why a generated rewrite is rejected. Rejected rewrites are retried; a slot still
without one is left empty (counted as "unfilled"): repeating the original caption there would only
weight the original more in the loader's draw."""
from __future__ import annotations

import re
from difflib import SequenceMatcher

from common.text import normalize_words

# duplicate: says what a rewrite already kept for the same caption says (back-translation is deterministic,
# so its n > 1 outputs are one text n times): counted once, the repeats rejected like any other
REASONS = ("empty", "identical", "copied_example", "too_long", "non_text", "duplicate")
MAX_WORDS = 60     # CLIP's context is 77 tokens; longer rewrites get truncated anyway
MAX_CHARS = 320
NEAR_COPY = 0.85   # character similarity to a pool example above which the output counts as a copy
_PREFIX = re.compile(r"^\s*(output|rewrite|caption)\s*:\s*", re.I)


def clean_output(text: str) -> str:
    """Strip what models add around the answer: a repeated "Output:" label, wrapping quotes."""
    text = _PREFIX.sub("", " ".join(text.split()))  # any run of whitespace (U+2028 included) is one space
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def same_text(text: str, caption: str) -> bool:
    """The rewrite says exactly what the caption says, up to case, punctuation, underscores and spacing."""
    return normalize_words(text) == normalize_words(caption)


def reject_reason(text: str, caption: str, examples: list[tuple[str, str]] = (),
                  kept: list[str] = ()) -> str | None:
    """None if the rewrite is kept, else the first reason (one of REASONS) it fails. kept: the rewrites
    already kept for this caption."""
    norm = normalize_words(text)
    if not norm:
        return "empty"
    if same_text(text, caption):
        return "identical"
    if any(same_text(text, k) for k in kept):
        return "duplicate"
    # Small models often echo an example with a word changed; the caption itself never appears there.
    if any(SequenceMatcher(None, norm, normalize_words(e)).ratio() >= NEAR_COPY
           for pair in examples for e in pair):
        return "copied_example"
    words = text.split()
    if len(words) > MAX_WORDS or len(text) > MAX_CHARS:
        return "too_long"
    letters = sum(c.isalpha() for c in text)
    if letters < 0.5 * len(text.replace(" ", "")):
        return "non_text"
    # Degenerate sampling loops: one word 4 times in a row, or long texts of few distinct words.
    lowered = [w.lower() for w in words]
    if any(lowered[i] == lowered[i + 1] == lowered[i + 2] == lowered[i + 3] for i in range(len(words) - 3)):
        return "non_text"
    if len(words) >= 8 and len(set(lowered)) < 0.4 * len(words):
        return "non_text"
    return None
