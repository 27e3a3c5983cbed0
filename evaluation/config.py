"""What an evaluation run is asked to do: eval.py's flags and YAML keys, and train.py's periodic zero-shot.

One dataclass for both, so the trainer's in-training numbers come from exactly the code and settings of a
standalone evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.config import ConfigError, option

PROTOCOLS = ("zeroshot", "fewshot", "linear_probe", "retrieval")
OUTPUT_FORMATS = ("laclip", "clip_benchmark")


@dataclass
class EvalConfig:
    checkpoint: str = option("", help="an export directory (train.py's checkpoints/step-N/export), a "
                             ".safetensors/.pt file, an open_clip state dict (needs model), an open_clip hub "
                             "folder (local-dir:PATH) or hf-hub:ORG/NAME")
    model: str | None = option(None, help="model/configs name, needed for open_clip state dicts")
    datasets: list[str] = option(factory=lambda: ["digits"],
                                 help="CLIP_benchmark-style dataset names (comma-separated on the command line)")
    data_root: str = option("data", help="where the datasets are (nothing is downloaded)")
    out: str = option("results.json", help="result JSON; with format clip_benchmark a folder of one JSON per "
                      "set and task")
    format: str = option("laclip", choices=OUTPUT_FORMATS,
                         help="laclip (one JSON) | clip_benchmark (evaluation/clip_benchmark.py)")
    protocols: list[str] = option(factory=lambda: list(PROTOCOLS), choices=PROTOCOLS,
                                  help="protocols to run (comma-separated on the command line)")
    cache_dir: str = option(".cache/eval_features", help="feature cache directory ('' = none)")
    batch_size: int = option(256, help="images per forward")
    workers: int = option(2, help="data loader workers")
    device: str = option("auto", help="auto (cuda when present) | cpu | cuda | cuda:N")
    max_per_split: int = option(0, help=">0: a fixed subsample of each split (quick CPU runs)")
    fewshot_ways: int = option(5, help="few-shot: classes per episode")
    fewshot_shots: int = option(5, help="few-shot: labelled examples per class")
    fewshot_queries: int = option(15, help="few-shot: queries per class")
    fewshot_episodes: int = option(1000, help="few-shot: episodes averaged")
    seed: int = option(0, help="seed of subsampling, episodes and the probe's split")
    probe_val_fraction: float = option(0.2, help="linear probe: training fraction held out to pick the "
                                       "regularisation")
    probe_max_iter: int = option(1000, help="linear probe: solver iterations")
    recall_k: list[int] = option(factory=lambda: [1, 5, 10], flag="--recall_k",
                                 help="retrieval: the K of each recall@K (CLIP_benchmark's --recall_k; space- or "
                                 "comma-separated)")
    progress: bool = option(True, help="a tqdm bar per split while its features are extracted")

    def validate(self):
        if not self.recall_k or min(self.recall_k) < 1:
            raise ConfigError("recall_k", f"{self.recall_k} must be one or more integers >= 1")
