"""The demo's settings and its four training methods, shared by scripts/demo.py (which runs the stages)
and scripts/report.py (which can rewrite a finished demo's report on its own)."""
from __future__ import annotations

import dataclasses

from common.config import option

# method -> (label in the report, which pack, train.py text_mode). Every pack holds the same images and
# original captions; only the other texts differ: the LLM rewrites (all, k of them per image, or those
# scoring at least min_fidelity), the datasets' own human alt texts (the faithful oracle), or EDA's word
# edits. Every text_mode=rewrite method draws the original with the same probability (caption_p_original).
METHODS = {"clip": ("CLIP", "llm", "original"), "laclip": ("LaCLIP", "llm", "rewrite"),
           "laclip_1": ("LaCLIP, 1 rewrite", "llm_1", "rewrite"),
           "laclip_2": ("LaCLIP, 2 rewrites", "llm_2", "rewrite"),
           "laclip_filtered": ("LaCLIP, faithful rewrites", "llm_filtered", "rewrite"),
           "laclip_human": ("LaCLIP, human alt texts", "human", "rewrite"),
           "laclip_mt": ("LaCLIP-MT", "llm", "all"), "eda": ("EDA", "eda", "rewrite")}


@dataclasses.dataclass
class DemoConfig:
    out: str = option("results/demo", help="where every stage writes")
    datasets: list = option(factory=lambda: ["openclipart", "emoji"], help="image folders built by packing.builders")
    max_samples: int | None = option(None, help="samples per dataset (default: all)")
    build_image_size: int = option(256, help="size the dataset builders render at")
    heldout_fraction: float = option(0.1, help="fraction of keys (by hash) held out for evaluation")
    data_cache: str | None = option(None, help="where the builders cache image folders (default: $LACLIP_DATA or "
                                 "~/.cache/laclip/datasets)")
    shipped_rewrites: str = option("data/rewrites", help="the shipped rewrite store (make rewrites)")
    shipped_sample: str = option("data/rewrites/demo/input.jsonl", help="shipped rewrites are used for this fixed "
                                 "sample of training captions only; '' = every caption")
    train_require: list = option(factory=list, help="train only on the images that have these human texts "
                                 "(alt_texts fields, e.g. [description]: the caption-rich clip art); [] = all")
    train_min_rewrites: int = option(0, help="train only on the images with at least this many LLM rewrites "
                                     "(besides their caption), so that the k-rewrite packs give every image k")
    train_max_images: int | None = option(None, help="train on a fixed random subset of at most this many of "
                                          "the images left (seed 0); null = all")
    train_on: str = option("rewritten",
                           help="rewritten: the images whose captions have LLM rewrites | all: every image",
                           choices=("rewritten", "all"))
    min_rewritten: int = option(256, help="fewest rewritten training captions the demo accepts")
    live_rewrites: int = option(50, help="captions rewritten live with live_config (0 = none)")
    live_config: str = option("configs/rewrite.yaml", help="rewrite config of the live sample")
    live_pools: list | None = option(None, help="meta pools of the live sample (default: the config's)")
    eda_config: str = option("configs/rewrite_eda.yaml", help="rewrite config of the EDA baseline")
    min_fidelity: float = option(0.5, help="'faithful rewrites' keep the LLM rewrites whose fidelity (cosine "
                                 "similarity to the caption, rewrite/fidelity.py) is at least this: fixed in advance "
                                 "at the middle of the scale, never tuned on the held-out split")
    other_wording: list = option(factory=lambda: ["openclipart", "emoji"],
                                 help="held-out sets that get a second retrieval task whose texts are each image's "
                                      "other human text (clip art: its keywords; emoji: an alias) instead of the "
                                      "caption every method trains on")
    pack_max_side: int = option(64, help="packed images' short side")
    pack_quality: int = option(90, help="packed JPEG quality")
    samples_per_shard: int = option(100000, help="packed samples per shard")
    loader: str = option("auto", help="train.py loader kind: auto (the fastest present) | ffcv | dali | torch",
                         choices=("auto", "ffcv", "dali", "torch"))
    loader_bench_batches: int = option(40, help="batches of the loader throughput check")
    caption_p_original: float | None = option(0.2, help="text_mode=rewrite methods draw the original caption "
                                              "with this probability whatever the number of texts an image "
                                              "has (null: uniform over its texts, the paper's draw)")
    train_config: str = option("configs/demo_train.yaml", help="train.py config of every run")
    train_overrides: dict = option(factory=dict, help="train.py keys set over train_config")
    methods: list = option(factory=lambda: ["clip", "laclip", "laclip_filtered", "laclip_human", "laclip_mt", "eda"],
                           help="methods trained", choices=tuple(METHODS))
    seeds: int = option(1, help="seeds per method (>= 3 gives mean +- std)")
    steps: int = option(300, help="optimizer steps per training run")
    warmup_steps: int = option(30, help="warmup steps per training run")
    checkpoint_every: int = option(50, help="steps between the checkpoints the curves evaluate")
    ranks: int = option(2, help="deepspeed CPU ranks per training run")
    fmnist_max_per_split: int = option(2000, help="Fashion-MNIST samples per split (few-shot, linear probe); "
                                       "0 = no Fashion-MNIST evaluation")
    fewshot_episodes: int = option(1000, help="few-shot episodes on Fashion-MNIST")
    primary_method: str = option("laclip", help="the pre-registered comparison: this method minus CLIP",
                                 choices=tuple(METHODS))
    primary_metric: str = option("retrieval_other", help="the pre-registered primary metric (scripts/demo_stats.py "
                                 "METRICS), at the final step", choices=("zeroshot", "retrieval", "retrieval_other"))
    alpha: float = option(0.05, help="two-sided level of the primary test and of Holm's correction")
