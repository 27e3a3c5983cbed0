"""train.py's config: TrainConfig's keys, their defaults and meaning (`python train.py --help` lists them)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from common.config import ConfigError, as_dict, load, option

DATA_KINDS = ("synthetic", "torch", "ffcv", "dali")
# fp32 | the mixed modes, each with fp32 master weights (training.engine.run_precision: what runs where)
PRECISIONS = ("fp32", "bf16", "fp16", "amp", "amp_bf16")
REPORTERS = ("tensorboard", "wandb")


@dataclasses.dataclass
class TrainConfig:
    # model
    model: str = option("tiny", help="a model/configs/<name>.json")
    model_overrides: dict = option(factory=dict,
                                   help="merged into the model config, e.g. {vision_cfg: {qk_norm: true}}")
    pretrained: str = option("", flag="--pretrained", help="start weights for `model` (as open_clip's "
                             "--pretrained): an open_clip weights file (.safetensors/.pt/.bin), an export or "
                             "hub-layout folder or local-dir:PATH, hf-hub:ORG/NAME; a resumed run ignores it "
                             "(training/pretrained.py)")
    pretrained_sha256: str = option("", help="the pretrained file's sha256, filled in by train.py in the run's "
                                    "config.yaml; when set, any other file is refused")
    # data
    data: str = option("", help="required: torch | ffcv | dali read data_root (loaders.build_loader); synthetic: "
                       "seeded random data, only when asked for", choices=DATA_KINDS)
    data_root: str = option("", help="packed dataset directory (packing.pack); needed unless data=synthetic")
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
    num_workers: int = option(1, flag="--workers", help="loader worker processes per rank")
    synthetic_samples: int = option(4096, help="dataset size of data=synthetic")
    # batch
    micro_batch: int = option(8, flag="--batch-size", help="samples per rank per forward (--batch-size, as open_clip's "
                              "per-GPU batch; global batch = micro_batch x ranks x accumulation)")
    accumulation: int = option(1, help="micro batches per optimizer step (gradient cache: negatives = global batch)")
    # engine
    zero_stage: int = option(1, help="DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    precision: str = option("fp32", flag="--precision", choices=PRECISIONS,
                            help="fp32 | bf16 | fp16 (dynamic loss scaling; where the accelerator has fp16: GPUs, "
                            "not this CPU's DeepSpeed) | amp (open_clip's mixed precision: fp16 on GPUs, bf16 on CPU, "
                            "the dtype of torch's CPU autocast) | amp_bf16 (= bf16); mixed modes keep fp32 masters")
    grad_checkpointing: bool = option(False, help="activation checkpointing in the towers")
    compile: bool = option(False, help="torch.compile through DeepSpeed's engine.compile()")
    attention: str = option("auto", help="attention kernel: xformers where it runs, else SDPA (auto; train.log "
                            "says which ran and why) | xformers (refuse to start without it) | sdpa",
                            choices=("auto", "xformers", "sdpa"))
    # optimizer and schedule
    lr: float = option(5e-4, flag="--lr", help="peak learning rate (AdamW)")
    min_lr_ratio: float = option(0.0, help="the cosine ends at lr * min_lr_ratio")
    warmup_steps: int = option(100, flag="--warmup", help="linear warmup steps")
    total_steps: int = option(1000, help="optimizer steps of the whole schedule")
    epochs: float = option(0.0, flag="--epochs", help=">0: total_steps = ceil(epochs x dataset samples / global "
                           "batch), set at start from the pack's num_samples (or synthetic_samples)")
    weight_decay: float = option(0.2, flag="--wd", help="AdamW weight decay (weight matrices only)")
    betas: tuple = option((0.9, 0.98), help="AdamW betas, two numbers")
    eps: float = option(1e-8, help="AdamW epsilon")
    grad_clip: float = option(1.0, help="gradient norm clipping (0 = off)")
    # run
    seed: int = option(0, flag="--seed", help="seed of weights, data order and augmentation")
    logs: str = option("runs", flag="--logs", help="where run directories go (open_clip's --logs)")
    name: str = option("default", flag="--name", help="the run's name: run_dir defaults to <logs>/<name>")
    run_dir: str = option("", help="config.yaml, metrics.jsonl, train.log, tensorboard/, checkpoints/; "
                          "'' = <logs>/<name>")
    checkpoint_every: int = option(1000, help="steps between checkpoints; 0 = only at the end and on SIGTERM")
    keep_checkpoints: int = option(0, help="keep the newest N checkpoints (0 = all)")
    eval_every: int = option(0, help="zero-shot evaluation every N steps (0 = off)")
    eval_datasets: str = option("", help="comma-separated eval.py dataset names, e.g. imagenet1k,cifar10")
    eval_data_root: str = option("data", help="where the eval datasets are")
    eval_max_per_split: int = option(0, help=">0: a fixed subsample per split (quick checks)")
    eval_timeout_s: float = option(86400.0, help="how long the other ranks wait for rank 0's in-training "
                                   "evaluation (a separate wait: the collective timeout does not apply to it)")
    collective_timeout_s: float = option(1800.0, help="timeout of every collective (all-reduce, barrier, "
                                         "checkpoint gather); DeepSpeed's own default is 600")
    deepspeed: dict = option(factory=dict, help="merged into the generated DeepSpeed config (any DeepSpeed option)")
    stop_after: int = option(0, help="stop (with a checkpoint) after this step; 0 = total_steps")
    progress: bool = option(True, help="tqdm bars on rank 0 (training, and in-training evaluation's)")
    report_to: list[str] = option(factory=lambda: ["tensorboard"], choices=REPORTERS, flag="--report-to",
                                  help="where rank 0 logs the metrics besides metrics.jsonl: tensorboard (<run_dir>/"
                                  "tensorboard), wandb (the W&B run's id is kept in <run_dir>/wandb_id for resumes; "
                                  "WANDB_MODE=offline, WANDB_DIR... as usual); [] = neither")
    wandb_project: str = option("laclip", help="report_to wandb: the W&B project (the run's name: run_dir's name)")

    def __post_init__(self):
        self.run_dir = self.run_dir or str(Path(self.logs) / self.name)

    def validate(self):
        if not self.data:  # no default: a command missing its data must not start a run on random data
            raise ConfigError("data", "required: data=torch|ffcv|dali with data_root=<packed dataset>, or "
                              "data=synthetic for seeded random data")
        if self.data != "synthetic" and not self.data_root:
            raise ConfigError("data_root", f"data={self.data!r} needs data_root (a packed dataset directory)")
        for key in ("eval_timeout_s", "collective_timeout_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, f"{getattr(self, key)} must be > 0 seconds")
        for key in ("micro_batch", "accumulation", "total_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"{getattr(self, key)} must be >= 1")
        if self.precision != "fp32" and self.zero_stage == 0:
            # DeepSpeed 0.19.8 at stage 0 wraps the optimizer in FP16_UnfusedOptimizer (bf16) or FP16_Optimizer
            # (fp16): gradients accumulate in the half dtype (fp32 accumulation raises NotImplementedError
            # there) and the fp32 masters are not reachable through safe_get_full_fp32_param, so the clamp and
            # exports would miss them
            raise ConfigError("zero_stage", f"0 with precision={self.precision} is refused: DeepSpeed keeps fp32 "
                              "master weights and fp32 gradient accumulation only at ZeRO 1-3; use zero_stage=1")
        if self.epochs < 0:
            raise ConfigError("epochs", f"{self.epochs} must be >= 0")
        ds_wandb = (self.deepspeed.get("wandb") or {}).get("enabled")
        if "wandb" in self.report_to and ds_wandb:  # two wandb.init in one process: the second ends the first
            raise ConfigError("report_to", "wandb together with the deepspeed: wandb monitor: use one (report_to "
                              "wandb logs every metric of metrics.jsonl)")
        if len(self.betas) != 2:
            raise ConfigError("betas", f"{list(self.betas)}: expected two numbers")
        if self.eval_every and not self.eval_datasets:
            raise ConfigError("eval_datasets", f"eval_every={self.eval_every} needs eval_datasets")
        from evaluation.datasets import DatasetError, canonical_name  # names only: the sets open later
        try:
            [canonical_name(n.strip()) for n in self.eval_datasets.split(",") if n.strip()]
        except DatasetError as e:
            raise ConfigError("eval_datasets", str(e)) from None
        from loaders.sampling import caption_weights  # the loader's own check, before any rank starts
        try:
            caption_weights(self.caption_p_original, self.caption_style_weights or None)
        except ValueError as e:
            key = "caption_style_weights" if "style_weights" in str(e) else "caption_p_original"
            raise ConfigError(key, str(e)) from None


def load_config(path: str | None, overrides: list[str], flags: dict | None = None) -> TrainConfig:
    """Defaults <- YAML file <- alias flags {key: (value, flag)} <- `key=value` overrides; unknown keys and bad
    values are ConfigErrors."""
    return load(TrainConfig, path, overrides, flags)


def config_dict(cfg: TrainConfig) -> dict:
    return as_dict(cfg)


