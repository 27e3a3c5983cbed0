"""`python -m benchmarks pack --out pack.json`: packing throughput (samples/s) of `python -m packing`.

Packs a real image set (emoji or openclipart from packing.builders, built once and cached) into both
formats at 1 and 2 workers, and measures in the same run a baseline: a one-core loop that does the same
image work the simple way (Pillow decode, Pillow resize, Pillow JPEG encode), as most packing scripts do.
Keys: pack_samples_per_s (by worker count), pack_seconds, baseline_pil_per_core, bytes_per_sample_both_formats,
speedup_vs_pil (pack at 1 worker / baseline).

Ranks: the same set with 4 stand-in rewrites per sample, packed by 1 and by 2 rank processes (1 worker
each, forked together, waiting for each other between stages) through the key-hash-sharded join:
pack_samples_per_s_by_ranks, rank_scaling (2-rank rate / (2 x 1-rank rate)), and
laion400m_projection_hours: 400M samples / (per-core rate x rank scaling x ranks) for the node shape
given by --nodes and --cores-per-node (one rank per core), every step of a rank being O(N / ranks).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
import time

from benchmarks.common import parse_config, write_json
from common.config import option


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


def _stand_in_rewrites(folder: str, path: str) -> None:
    """4 rewrites per sample (built from its caption) so the sharded join has real rows to join."""
    with open(os.path.join(folder, "captions.jsonl")) as f, open(path, "w") as out:
        for line in f:
            r = json.loads(line)
            texts = [f"{style} {r['caption'].lower()}" for style in ("a photo of", "an image showing",
                                                                        "a drawing of", "a picture of")]
            out.write(json.dumps({"key": r["key"], "rewrites": texts}) + "\n")


def pack_by_ranks(folder: str, rewrites: str, out: str, ranks: int, a) -> float:
    """Samples/s of one pack by `ranks` rank processes started together (1 worker each), forked from this
    process so that none of them pays the imports (ffcv, numba, the tokenizer) inside the timing."""
    import multiprocessing

    from packing.pack import PackConfig, pack

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=pack, args=(PackConfig(
        input=folder, out=out, rewrites=rewrites, max_side=a.max_side, quality=a.quality,
        samples_per_shard=a.shard_size, workers=1, rank=r, world_size=ranks, wait_s=900),)) for r in range(ranks)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    for r, p in enumerate(procs):
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"pack rank {r} of {ranks} failed (exit code {p.exitcode})")
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "meta.json")) as f:
        return json.load(f)["num_samples"] / seconds


def projection(by_ranks: dict, nodes: int, cores_per_node: int, samples: int = 400_000_000) -> dict:
    per_core = by_ranks["1"]
    scaling = by_ranks["2"] / (2 * per_core)
    ranks = nodes * cores_per_node
    return {"hours": round(samples / (per_core * min(1.0, scaling) * ranks) / 3600, 2),
            "nodes": nodes, "cores_per_node": cores_per_node, "ranks": ranks, "samples": samples,
            "per_core_samples_per_s": per_core, "rank_scaling_applied": round(min(1.0, scaling), 3),
            "assumes": "one pack rank per core, this machine's per-core rate (same image sizes, small shards), the "
                       "2-rank scaling measured here holding at every rank count (each rank's steps are "
                       "O(N / ranks); rank 0's extra steps are O(#shards)), a shared file system that "
                       "keeps up"}


@dataclasses.dataclass
class PackBenchOptions:
    dataset: str = option("emoji", choices=("emoji", "openclipart"), help="builder of the source images")
    samples: int = option(2000, help="source images packed")
    image_size: int = option(256, help="size the builder renders at")
    max_side: int = option(128, help="pack resize target (below the source: real work)")
    quality: int = option(90, help="JPEG quality")
    workers: str = option("1,2", help="comma-separated worker counts")
    ranks: str = option("1,2", help="rank counts to pack with (separate processes)")
    repeats: int = option(3, help="rank runs per rank count (best kept)")
    shard_size: int = option(600, help="samples per shard in the rank runs")
    nodes: int = option(16, help="LAION-400M projection: nodes")
    cores_per_node: int = option(64, help="LAION-400M projection: cores (ranks) per node")
    out: str | None = option(None, help="where to write the JSON result")


def main(argv: list[str] | None = None) -> dict:
    from packing.builders import build_dataset, default_cache
    from packing.pack import PackConfig, pack

    a = parse_config(PackBenchOptions, "pack", argv, __doc__)

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
        rewrites = os.path.join(tmp, "rewrites.jsonl")
        _stand_in_rewrites(folder, rewrites)
        by_ranks = {}
        for attempt in range(a.repeats):  # alternating, best of repeats: the machine is shared
            for ranks in [int(r) for r in a.ranks.split(",")]:
                rate = pack_by_ranks(folder, rewrites, os.path.join(tmp, f"r{ranks}-{attempt}"), ranks, a)
                print(f"pack with {ranks} rank(s): {rate:.1f} samples/s", flush=True)
                by_ranks[str(ranks)] = max(by_ranks.get(str(ranks), 0), round(rate, 1))
        result["pack_samples_per_s_by_ranks"] = by_ranks
        result["rank_runs"] = {"shard_size": a.shard_size, "workers_per_rank": 1, "repeats": a.repeats,
                               "note": "small shards: FFCV's writer start (a process + numba compile, seconds) "
                                       "per shard weighs on these rates; real shards (5-10k samples) amortise it"}
        if "1" in by_ranks and "2" in by_ranks:
            result["rank_scaling"] = round(by_ranks["2"] / (2 * by_ranks["1"]), 3)
            result["laion400m_projection_hours"] = projection(by_ranks, a.nodes, a.cores_per_node)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return write_json(result, a.out)
