"""Every stage benchmark in one run: one JSON plus a Markdown summary of the ratios to the baselines.

    python -m benchmarks all --out benchmarks.json [--full]

Quick sizes by default; --full passes --full to the benchmarks that have a long mode. A benchmark that
fails is recorded with its error and the others still run.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import time
import traceback

from benchmarks.common import parse_config, write_json
from common.config import option

STAGES = ["store", "rewrite", "pack", "loader", "train", "eval"]
# The headline ratio of each stage: (key, what it compares, the target the issues set).
HEADLINES = {
    "store": [("bytes_vs_zstd_text", "store bytes / plain zstd bytes", "< 1"),
              ("tokenize_speedup", "tokenizer / reference tokenizer", ">= 10")],
    "rewrite": [("speedup_vs_hf", "default CPU engine / transformers, captions/s", ">= 5"),
                ("pipeline_overhead", "1 - pipeline / raw engine", "< 0.10")],
    "pack": [("speedup_vs_pil", "pack (1 worker) / plain Pillow loop", "> 1")],
    "loader": [("best_vs_decode_bound", "best loader (1 worker) / decode-bound loop, wall", ">= 0.8"),
               ("best_vs_decode_bound_cpu_time", "the same per CPU-second", ">= 0.8"),
               ("best_vs_pil_baseline", "best loader / torch+PIL baseline", ">= 1.5"),
               ("caption_draw_overhead", "1 - with draw / without, wall", "< 0.03"),
               ("caption_draw_overhead_isolated", "compiled draw alone / per-sample cost", "< 0.03")],
    "train": [("ratio", "ours / open_clip samples/s", ">= 1.0")],
    "eval": [("probe_speedup", "sklearn probe seconds (its faster thread count) / ours", ">= 1.0"),
             ("probe_accuracy_delta", "our probe accuracy - sklearn's, points", ">= 0")],
}


def markdown(results: dict) -> str:
    lines = ["| stage | measure | value | target |", "|---|---|---|---|"]
    for stage, result in results.items():
        if "error" in result:
            lines.append(f"| {stage} | failed: {result['error'].splitlines()[-1][:80]} | | |")
            continue
        for key, what, target in HEADLINES.get(stage, []):
            value = result.get(key)
            shown = f"{value:.3g}" if isinstance(value, (int, float)) else "n/a"
            lines.append(f"| {stage} | {what} (`{key}`) | {shown} | {target} |")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class AllOptions:
    out: str = option("results/benchmarks.json", help="where to write the combined JSON result")
    full: bool = option(False, help="long sizes where a benchmark has them")
    only: str = option(",".join(STAGES), help="comma-separated stages")


def main(argv: list[str]) -> dict:
    args = parse_config(AllOptions, "all", argv, __doc__)

    out_dir = os.path.dirname(os.path.abspath(args.out))
    results = {}
    for stage in args.only.split(","):
        try:
            module = importlib.import_module(f"benchmarks.{stage}")
        except ModuleNotFoundError:
            continue
        stage_argv = ["--out", os.path.join(out_dir, f"{stage}.json")] + (["--full"] if args.full else [])
        start = time.perf_counter()
        try:
            try:
                results[stage] = module.main(stage_argv)
            except SystemExit:  # this benchmark has no --full: run its default size
                results[stage] = module.main(stage_argv[:2])
        except Exception:  # one broken stage must not hide the others' numbers
            results[stage] = {"error": traceback.format_exc()}
        results[stage]["seconds"] = time.perf_counter() - start
    summary = markdown(results)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write("# Benchmarks\n\n" + summary)
    print(summary)
    return write_json({"benchmark": "all", "stages": results}, args.out)
