"""The demo's settings and its four training methods, shared by scripts/demo.py (which runs the stages)
and scripts/report.py (which can rewrite a finished demo's report on its own)."""
from __future__ import annotations

import dataclasses

# method -> (label in the report, which pack, train.py text_mode)
METHODS = {"clip": ("CLIP", "llm", "original"), "laclip": ("LaCLIP", "llm", "rewrite"),
           "laclip_mt": ("LaCLIP-MT", "llm", "all"), "eda": ("EDA", "eda", "rewrite")}


@dataclasses.dataclass
class DemoConfig:
    out: str = "results/demo"
    datasets: list = dataclasses.field(default_factory=lambda: ["openclipart", "emoji"])
    max_samples: int | None = None
    build_image_size: int = 256
    heldout_fraction: float = 0.1
    data_cache: str | None = None
    shipped_rewrites: str = "data/rewrites"
    # shipped rewrites are used for this fixed sample of training captions only (1,000 keys), so the demo
    # trains on as many images as before the shipped store covered every caption; "" = every caption
    shipped_sample: str = "data/rewrites/demo/input.jsonl"
    train_on: str = "rewritten"
    min_rewritten: int = 256
    live_rewrites: int = 50
    live_config: str = "configs/rewrite.yaml"
    live_pools: list | None = None
    eda_config: str = "configs/rewrite_eda.yaml"
    pack_max_side: int = 64
    pack_quality: int = 90
    samples_per_shard: int = 100000
    loader: str = "auto"
    loader_bench_batches: int = 40
    train_config: str = "configs/demo_train.yaml"
    train_overrides: dict = dataclasses.field(default_factory=dict)
    methods: list = dataclasses.field(default_factory=lambda: list(METHODS))
    seeds: int = 1
    steps: int = 300
    warmup_steps: int = 30
    checkpoint_every: int = 50
    ranks: int = 2
    fmnist_max_per_split: int = 2000
    fewshot_episodes: int = 1000
