"""What every rewrite engine shares: the request, the Engine interface, the paper's sampling settings.

Its own module so that the engines (rewrite/eda.py, backtranslate.py, openai_engine.py) and the
factory that picks one of them by name (rewrite/engines.py) can both import it without importing
each other.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

# Sampling settings of the paper (LaCLIP, section 3): nucleus sampling, one line, at most 77 tokens.
TEMPERATURE = 0.9
TOP_P = 0.95
MAX_NEW_TOKENS = 77


@dataclass(frozen=True)
class Request:
    key: str
    caption: str
    prompt: str | None
    seed: int


def mix_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


class Engine:
    name = "base"
    uses_prompts = False
    model_id = ""
    tokens_generated = 0  # counted for the benchmark's tokens_per_s

    def generate(self, requests: list[Request], n: int) -> list[list[str]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine started (a server process); a no-op for in-process engines."""
