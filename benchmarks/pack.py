"""`python -m benchmarks pack --out pack.json`: packing throughput (samples/s) of `python -m loaders.pack`.

Packs a real image set (emoji or openclipart from loaders.datasets, built once and cached) into both
formats at 1 and 2 workers, and measures in the same run a baseline: a one-core loop that does the same
image work the simple way (Pillow decode, Pillow resize, Pillow JPEG encode), as most packing scripts do.
Keys: pack_samples_per_s (by worker count), pack_seconds, baseline_pil_per_core, bytes_per_sample_both_formats,
speedup_vs_pil (pack at 1 worker / baseline).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time

from benchmarks.common import write_json


def _pil_baseline(folder: str, max_side: int, quality: int, limit: int) -> float:
    from PIL import Image

    with open(os.path.join(folder, "captions.jsonl")) as f:
        rows = [json.loads(line) for line in f][:limit]
    start = time.perf_counter()
    for r in rows:
        with Image.open(os.path.join(folder, r["file"])) as im:
            im = im.convert("RGB")
            w, h = im.size
            if min(w, h) > max_side:
                s = max_side / min(w, h)
                im = im.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
            im.save(io.BytesIO(), "JPEG", quality=quality)
    return len(rows) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    from loaders.datasets import build_dataset, default_cache
    from loaders.pack import PackConfig, pack

    p = argparse.ArgumentParser(prog="python -m benchmarks pack")
    p.add_argument("--dataset", default="emoji", choices=["emoji", "openclipart"])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=256, help="size the builder renders at")
    p.add_argument("--max-side", type=int, default=128, help="pack resize target (below the source: real work)")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    folder = build_dataset(a.dataset, os.path.join(default_cache(), f"{a.dataset}-bench"),
                           max_samples=a.samples, image_size=a.image_size)
    result = {"dataset": a.dataset, "samples": a.samples, "image_size": a.image_size, "max_side": a.max_side,
              "quality": a.quality, "pack_samples_per_s": {}, "pack_seconds": {}}
    tmp = tempfile.mkdtemp(prefix="bench-pack-")
    try:
        # warm-up: the first pack in a process pays imports (ffcv/numba, tokenizer), not packing
        pack(PackConfig(input=folder, out=os.path.join(tmp, "warm"), max_side=a.max_side, max_samples=50,
                        workers=1))
        for workers in [int(w) for w in a.workers.split(",")]:
            out = os.path.join(tmp, f"w{workers}")
            start = time.perf_counter()
            summary = pack(PackConfig(input=folder, out=out, max_side=a.max_side, quality=a.quality,
                                      samples_per_shard=1000, workers=workers))
            seconds = time.perf_counter() - start
            result["pack_samples_per_s"][workers] = round(summary["num_samples"] / seconds, 1)
            result["pack_seconds"][workers] = round(seconds, 2)
            result["bytes_per_sample_both_formats"] = round(summary["bytes"] / summary["num_samples"], 1)
        result["baseline_pil_per_core"] = round(_pil_baseline(folder, a.max_side, a.quality, a.samples), 1)
        first = result["pack_samples_per_s"][min(result["pack_samples_per_s"])]
        result["speedup_vs_pil"] = round(first / result["baseline_pil_per_core"], 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return write_json(result, a.out)
