"""CLIP_benchmark's results format: one JSON per (model, dataset, task).

Each file is what `clip_benchmark eval` writes: {"dataset", "model", "pretrained", "task", "metrics",
"language"}, with metrics as fractions: zeroshot_classification -> acc1, acc5 (NaN under 5 classes, as
there), mean_per_class_recall; zeroshot_retrieval -> image_retrieval_recall@K (text query, image found)
and text_retrieval_recall@K (image query, one of its texts found). File names follow its default
template, {dataset}_{pretrained}_{model}_{language}_{task}.json, with "/" in names replaced by "_".
Few-shot and our linear probe have no counterpart there and are not written.
"""
from __future__ import annotations

import os
from pathlib import Path

from common.io import write_json_atomic
from evaluation.datasets import clip_benchmark_name


def to_clip_benchmark(result: dict) -> dict[str, dict]:
    """Our per-set result (percent) -> {task: metrics as fractions}."""
    tasks = {}
    zs = result.get("zeroshot")
    if zs:
        tasks["zeroshot_classification"] = {"acc1": zs["top1"] / 100,
                                            "acc5": zs["top5"] / 100 if "top5" in zs else float("nan"),
                                            "mean_per_class_recall": zs["mean_per_class"] / 100}
    rt = result.get("retrieval")
    if rt:
        metrics = {}
        for k in [key.rsplit("@", 1)[1] for key in rt if key.startswith("text_to_image_R@")]:   # eval's recall_k
            metrics[f"image_retrieval_recall@{k}"] = rt[f"text_to_image_R@{k}"] / 100
            metrics[f"text_retrieval_recall@{k}"] = rt[f"image_to_text_R@{k}"] / 100
        tasks["zeroshot_retrieval"] = metrics
    return tasks


def _slug(s: str) -> str:
    return s.replace("/", "_").replace(":", "_")


def write_results(results: dict, out_dir: Path, *, model: str, pretrained: str,
                  language: str = "en") -> list[str]:
    """Write one file per (set, task) into out_dir atomically; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, result in results.items():
        dataset = clip_benchmark_name(name)
        for task, metrics in to_clip_benchmark(result).items():
            dump = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
                    "metrics": metrics, "language": language}
            path = out_dir / (f"{_slug(dataset)}_{_slug(os.path.basename(pretrained.rstrip('/')))}_"
                              f"{_slug(model)}_{language}_{task}.json")
            write_json_atomic(path, dump)
            written.append(str(path))
    return written
