"""train.py's config: TrainConfig's keys, their defaults and meaning (`python train.py --help` lists them)."""
from __future__ import annotations

import dataclasses

from common.config import ConfigError, as_dict, load, option

DATA_KINDS = ("synthetic", "torch", "ffcv", "dali")


@dataclasses.dataclass
class TrainConfig:
    # model
    model: str = option("tiny", help="a model/configs/<name>.json")
    model_overrides: dict = option(factory=dict, help="merged into the model config, e.g. {vision_cfg: {qk_norm: true}}")
    # data
    data: str = option("synthetic", help="loader kind (loaders.build_loader); synthetic: seeded random data",
                       choices=DATA_KINDS)
    data_root: str = option("", help="packed dataset directory (loaders.pack); needed unless data=synthetic")
    text_mode: str = option("rewrite", help="original (CLIP) | rewrite (LaCLIP) | all (LaCLIP-MT)",
                            choices=("original", "rewrite", "all"))
    max_texts: int = option(5, help="text slots per sample in text_mode=all")
    caption_p_original: float | None = option(None, help="text_mode=rewrite: chance of drawing the original "
                                              "caption (null: it weighs like one rewrite style)")
    caption_style_weights: dict = option(factory=dict, help="text_mode=rewrite: rewrite style -> weight in the "
                                         "caption draw, e.g. {human: 2, coco: 0.5}; {} = uniform (the paper)")
    mt_text_to_image: str = option("all", help="LaCLIP-MT's text-to-image term: all texts | the original caption",
                                   choices=("all", "original"))
    image_loss: str = option("clip", help="clip | slip (adds SimCLR on two views)", choices=("clip", "slip"))
    ssl_weight: float = option(1.0, help="SLIP's weight of the SimCLR term")
    augment: bool = option(True, help="random-resized-crop augmentation in the loaders")
    num_workers: int = option(1, help="loader worker processes per rank")
    synthetic_samples: int = option(4096, help="dataset size of data=synthetic")
    # batch
    micro_batch: int = option(8, help="samples per rank per forward")
    accumulation: int = option(1, help="micro batches per optimizer step (gradient cache: negatives = global batch)")
    # engine
    zero_stage: int = option(1, help="DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    precision: str = option("fp32", help="fp32 | bf16", choices=("fp32", "bf16"))
    grad_checkpointing: bool = option(False, help="activation checkpointing in the towers")
    compile: bool = option(False, help="torch.compile through DeepSpeed's engine.compile()")
    # optimizer and schedule
    lr: float = option(5e-4, help="peak learning rate (AdamW)")
    min_lr_ratio: float = option(0.0, help="the cosine ends at lr * min_lr_ratio")
    warmup_steps: int = option(100, help="linear warmup steps")
    total_steps: int = option(1000, help="optimizer steps of the whole schedule")
    weight_decay: float = option(0.2, help="AdamW weight decay (weight matrices only)")
    betas: tuple = option((0.9, 0.98), help="AdamW betas, two numbers")
    eps: float = option(1e-8, help="AdamW epsilon")
    grad_clip: float = option(1.0, help="gradient norm clipping (0 = off)")
    # run
    seed: int = option(0, help="seed of weights, data order and augmentation")
    run_dir: str = option("runs/default", help="config.yaml, metrics.jsonl, train.log, tensorboard/, checkpoints/")
    checkpoint_every: int = option(1000, help="steps between checkpoints; 0 = only at the end and on SIGTERM")
    keep_checkpoints: int = option(0, help="keep the newest N checkpoints (0 = all)")
    eval_every: int = option(0, help="zero-shot evaluation every N steps (0 = off)")
    eval_datasets: str = option("", help="comma-separated eval.py dataset names, e.g. imagenet1k,cifar10")
    eval_data_root: str = option("data", help="where the eval datasets are")
    eval_max_per_split: int = option(0, help=">0: a fixed subsample per split (quick checks)")
    deepspeed: dict = option(factory=dict, help="merged into the generated DeepSpeed config (any DeepSpeed option)")
    stop_after: int = option(0, help="stop (with a checkpoint) after this step; 0 = total_steps")
    progress: bool = option(True, help="tqdm bar on rank 0")

    def validate(self):
        if self.data != "synthetic" and not self.data_root:
            raise ConfigError("data_root", f"data={self.data!r} needs data_root (a packed dataset directory)")
        for key in ("micro_batch", "accumulation", "total_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"{getattr(self, key)} must be >= 1")
        if len(self.betas) != 2:
            raise ConfigError("betas", f"{list(self.betas)}: expected two numbers")
        if self.eval_every and not self.eval_datasets:
            raise ConfigError("eval_datasets", f"eval_every={self.eval_every} needs eval_datasets")
        from loaders.sampling import caption_weights  # the loader's own check, before any rank starts
        try:
            caption_weights(self.caption_p_original, self.caption_style_weights or None)
        except ValueError as e:
            key = "caption_style_weights" if "style_weights" in str(e) else "caption_p_original"
            raise ConfigError(key, str(e)) from None


def load_config(path: str | None, overrides: list[str]) -> TrainConfig:
    """Defaults <- YAML file <- `key=value` overrides; unknown keys and bad values are ConfigErrors."""
    return load(TrainConfig, path, overrides)


def config_dict(cfg: TrainConfig) -> dict:
    return as_dict(cfg)


