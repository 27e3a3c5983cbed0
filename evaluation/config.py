"""What an evaluation run is asked to do: eval.py's flags and YAML keys, and train.py's periodic zero-shot.

One dataclass for both, so the trainer's in-training numbers come from exactly the code and settings of a
standalone evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PROTOCOLS = ("zeroshot", "fewshot", "linear_probe", "retrieval")
OUTPUT_FORMATS = ("laclip", "clip_benchmark")


@dataclass
class EvalConfig:
    checkpoint: str = ""
    model: str | None = None            # model/configs name, needed for open_clip state dicts
    datasets: list[str] = field(default_factory=lambda: ["digits"])
    data_root: str = "data"
    out: str = "results.json"           # with format clip_benchmark: a folder of one JSON per set and task
    format: str = "laclip"              # or clip_benchmark (evaluation/clip_benchmark.py)
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    cache_dir: str = ".cache/eval_features"
    batch_size: int = 256
    workers: int = 2
    device: str = "auto"
    max_per_split: int = 0              # >0: fixed subsample of each split (quick CPU runs)
    fewshot_ways: int = 5
    fewshot_shots: int = 5
    fewshot_queries: int = 15
    fewshot_episodes: int = 1000
    seed: int = 0
    probe_val_fraction: float = 0.2
    probe_max_iter: int = 1000
