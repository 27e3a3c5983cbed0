"""EDA baseline (Wei & Zou, 2019): synonym replacement, random insertion, random swap, random deletion.

Synonyms come from WordNet 3.0 as Debian's `wordnet-base` ships it (/usr/share/wordnet, or $WORDNET_DIR).
The PyPI `wn` package needs a data download at run time, which these offline machines cannot do.
"""
from __future__ import annotations

import os
import random
from functools import lru_cache
from pathlib import Path

from .engine_base import Engine

ALPHA = 0.1  # fraction of words changed per operation, the usual EDA setting
POS = ("noun", "verb", "adj", "adv")
STOPWORDS = frozenset("""a an the and or but if of at by for with about against between into through
during before after above below to from up down in out on off over under again further then once here there
when where why how all any both each few more most other some such no nor not only own same so than too very
s t can will just don should now i me my we our you your he him his she her it its they them their what which
who whom this that these those am is are was were be been being have has had having do does did doing""".split())


@lru_cache(maxsize=1)
def _index() -> dict[str, list[tuple[str, int]]]:
    """lemma -> [(pos, synset byte offset)], read once from WordNet's index.<pos> files."""
    root = Path(os.environ.get("WORDNET_DIR", "/usr/share/wordnet"))
    if not (root / "index.noun").is_file():
        raise FileNotFoundError(f"WordNet not found in {root}: install the Debian package wordnet-base "
                                "(scripts/setup.sh does) or set WORDNET_DIR")
    index: dict[str, list[tuple[str, int]]] = {}
    for pos in POS:
        with open(root / f"index.{pos}", encoding="latin-1") as f:
            for line in f:
                if line.startswith(" "):  # licence header
                    continue
                parts = line.split()
                n_synsets, n_ptrs = int(parts[2]), int(parts[3])
                offsets = parts[6 + n_ptrs:6 + n_ptrs + n_synsets]
                index.setdefault(parts[0], []).extend((pos, int(o)) for o in offsets)
    return index


@lru_cache(maxsize=50_000)
def synonyms(word: str) -> tuple[str, ...]:
    """Lemmas sharing a synset with the word (its other senses included, as EDA does), sorted."""
    root = Path(os.environ.get("WORDNET_DIR", "/usr/share/wordnet"))
    found = set()
    for pos, offset in _index().get(word.lower(), ()):
        with open(root / f"data.{pos}", "rb") as f:
            f.seek(offset)
            parts = f.readline().decode("latin-1").split()
        for i in range(int(parts[3], 16)):  # word count is hexadecimal; words are (lemma, lex_id) pairs
            lemma = parts[4 + 2 * i].split("(")[0].replace("_", " ").lower()
            if lemma != word.lower():
                found.add(lemma)
    return tuple(sorted(found))


def _replace(words, n, rng):
    words = list(words)
    candidates = [i for i, w in enumerate(words) if w.lower() not in STOPWORDS and synonyms(w)]
    rng.shuffle(candidates)
    for i in candidates[:n]:
        words[i] = rng.choice(synonyms(words[i]))
    return words


def _insert(words, n, rng):
    words = list(words)
    for _ in range(n):
        pool = [s for w in words if w.lower() not in STOPWORDS for s in synonyms(w)]
        if not pool:
            break
        words.insert(rng.randrange(len(words) + 1), rng.choice(pool))
    return words


def _swap(words, n, rng):
    words = list(words)
    for _ in range(n if len(words) > 1 else 0):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return words


def _delete(words, n, rng, p=ALPHA):
    kept = [w for w in words if rng.random() > p]
    return kept or [rng.choice(words)]


OPERATIONS = (_replace, _insert, _swap, _delete)


def eda(caption: str, rng: random.Random, alpha: float = ALPHA) -> str:
    """One augmented caption: one operation drawn uniformly, changing about alpha of the words."""
    words = caption.split()
    if not words:
        return caption
    n = max(1, int(alpha * len(words)))
    op = rng.choice(OPERATIONS)
    return " ".join(op(words, n, rng))


class EDAEngine(Engine):
    name = "eda"
    model_id = "wordnet-3.0"

    def __init__(self, alpha: float = ALPHA):
        self.alpha = alpha
        _index()  # fail early if WordNet is missing

    def generate(self, requests, n):
        return [[eda(r.caption, random.Random(f"{r.seed}:{j}"), self.alpha) for j in range(n)] for r in requests]
