"""Comparing texts by their words, the one rule every stage uses (a dataset's alternative texts, the
rewrite filter's "identical" and "copied_example", pack's "same as the original caption").

Case, punctuation, spacing and underscores do not count: every run of characters that are not letters or
digits separates words, so a file-name caption "bosnia_and_herzegovina" says what "Bosnia and
Herzegovina." says. TEXT_RULES numbers this rule; stores whose contents depend on it record the number
(a rewrite store's run.json, a pack's caption settings), so work done under another rule is not mixed in.
"""
from __future__ import annotations

import re

# 1: the rewrite filter kept underscores inside words ("a_b" differed from "a b"); 2: underscores separate
TEXT_RULES = 2
_NOT_WORD = re.compile(r"[\W_]+")


def normalize_words(text: str) -> str:
    """The lower-case words of `text` joined by single spaces ("" when it has none)."""
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())
