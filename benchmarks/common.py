"""Helpers shared by the stage benchmarks: timing and JSON output."""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Callable

from common.io import write_atomic


def rate(fn: Callable[[], int], min_seconds: float = 1.0, repeats: int = 3) -> float:
    """Best items/second of `fn` (which returns how many items it processed) over a few timed runs."""
    best = 0.0
    for _ in range(repeats):
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_seconds or done == 0:
            done += fn()
        best = max(best, done / elapsed)
    return best


def machine() -> dict:
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}


def write_json(result: dict, out: str | None) -> dict:
    result = {**result, "machine": machine()}
    text = json.dumps(result, indent=2)
    if out:
        write_atomic(out, text + "\n")
    print(text)
    return result


def parse_config(cls, name: str, argv, description: str | None = None):
    """A benchmark's options: its dataclass of option() keys, with --config FILE, --set key=value and a
    --kebab-case flag per key (common/config.py); a bad key or value is one line and exit status 2."""
    from common.config import build_parser, parse
    parser = build_parser(cls, f"python -m benchmarks {name}", description, flags="all")
    cfg, _ = parse(cls, parser, argv)
    return cfg
