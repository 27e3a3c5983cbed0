"""Meta pools: example (input => output) rewrite pairs, one JSONL file per style.

A pool file has one JSON object per line: {"input": "...", "output": "..."}. The four shipped pools are
data written for this project (rewrite/pools/*.jsonl); users can pass their own files instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.io import read_jsonl

POOL_DIR = Path(__file__).parent / "pools"
# The fixed order in which a caption's rewrites are listed in the store (one pool = one style).
DEFAULT_POOLS = ("chatbot_a", "chatbot_b", "coco", "human")


@dataclass(frozen=True)
class Pool:
    name: str
    pairs: tuple[tuple[str, str], ...]


def load_pool(name_or_path: str) -> Pool:
    """A shipped pool by name (e.g. "coco") or a path to a JSONL pool file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = POOL_DIR / f"{name_or_path}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"meta pool {name_or_path!r}: no file {path} (shipped: {', '.join(DEFAULT_POOLS)})")
    pairs = []
    for lineno, row in read_jsonl(path):
        try:
            pair = (str(row["input"]).strip(), str(row["output"]).strip())
        except KeyError as e:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with 'input' and 'output' ({e})") from e
        if not pair[0] or not pair[1] or "\n" in pair[0] + pair[1]:
            raise ValueError(f"{path}:{lineno}: input and output must be non-empty single lines")
        pairs.append(pair)
    if len(pairs) < 3:
        raise ValueError(f"{path}: a meta pool needs at least 3 pairs, found {len(pairs)}")
    return Pool(name=path.stem, pairs=tuple(pairs))
