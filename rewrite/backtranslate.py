"""Back-translation baseline through Apertium (rule-based MT, offline): English -> Spanish -> English.

One apertium process per direction per batch: captions are joined one per line (Apertium keeps line
breaks), so a batch of thousands of captions costs two process starts, not two per caption. The
round trip is deterministic, so n > 1 repeats the same text: the pipeline keeps it once per caption and
rejects the repeats as "duplicate" (rewrite/quality.py), so it never weighs more in the caption draw.
"""
from __future__ import annotations

import shutil
import subprocess

from .engine_base import Engine
from .prompt import clean_caption


def apertium(lines: list[str], pair: str) -> list[str]:
    if shutil.which("apertium") is None:
        raise FileNotFoundError("apertium not found: install the Debian packages apertium apertium-eng-spa")
    text = "\n".join(lines) + "\n"
    res = subprocess.run(["apertium", "-u", pair], input=text, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"apertium -u {pair} failed ({res.returncode}): {res.stderr.strip()[:500]}")
    out = res.stdout.split("\n")
    if out and out[-1] == "":
        out.pop()
    if len(out) != len(lines):
        raise RuntimeError(f"apertium -u {pair}: sent {len(lines)} lines, got {len(out)} back")
    return out


class BacktranslateEngine(Engine):
    name = "backtranslate"

    def __init__(self, pivot: str = "spa"):
        self.pair = ("eng-" + pivot, pivot + "-eng")
        self.model_id = f"apertium:{self.pair[0]}+{self.pair[1]}"

    def generate(self, requests, n):
        # Empty lines stay empty lines, so the count check still holds for empty captions.
        lines = [clean_caption(r.caption) for r in requests]
        back = apertium(apertium(lines, self.pair[0]), self.pair[1])
        # "-u" drops the unknown-word marks; "#" marks words the generator could not inflect.
        return [[b.replace("#", "").strip()] * n for b in back]
