"""The DeepSpeed engine of a TrainConfig: parameter groups, learning-rate schedule, DeepSpeed config, and
the logit-scale clamp after each step."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from common.config import ConfigError, merged
from training.config import TrainConfig

# DeepSpeed's dynamic loss scaling (its defaults, spelled out): start at 2^16, halve on an overflowing step
# (which is skipped) after `hysteresis` of them, double after 1000 clean steps (torch's GradScaler, which
# open_clip's amp uses, starts at 2^16 too)
FP16_LOSS_SCALING = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                     "hysteresis": 2, "min_loss_scale": 1}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW decay only on weight matrices: not on gains, biases, the logit scale, embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith(".bias")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: TrainConfig):
    """Multiplier of cfg.lr for optimizer step s (0-based): linear warmup, then cosine decay."""
    def f(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        progress = min(1.0, (s - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name()


def run_precision(precision: str, device_type: str | None = None) -> str:
    """What a `precision` runs as on `device_type` (default: DeepSpeed's accelerator): fp32, bf16 or fp16.
    amp is open_clip's mixed precision: fp16 on GPUs; on CPU bf16, the dtype of torch's CPU autocast.
    ConfigError where the accelerator has no fp16 (DeepSpeed refuses it on most CPUs)."""
    from deepspeed.accelerator import get_accelerator
    here = accelerator_name()
    device_type = device_type or here
    ran = {"amp": "bf16" if device_type == "cpu" else "fp16", "amp_bf16": "bf16"}.get(precision, precision)
    if ran == "fp16" and device_type == here:  # only this machine's accelerator can be asked
        if not get_accelerator().is_fp16_supported():
            raise ConfigError("precision", f"{precision}: DeepSpeed has no fp16 on this {device_type} (its "
                              "accelerator says so; fp16 needs a GPU); bf16 runs here (amp means bf16 on CPU)")
    return ran


def deepspeed_config(cfg: TrainConfig, device_type: str | None = None) -> dict:
    """The generated DeepSpeed config for `device_type` (default: DeepSpeed's accelerator) with the run
    config's `deepspeed:` mapping merged over it."""
    return merged(_generated_deepspeed_config(cfg, run_precision(cfg.precision, device_type)), cfg.deepspeed)


def _generated_deepspeed_config(cfg: TrainConfig, precision: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.accumulation,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay,
            # torch's fused AdamW kernel (CPU and CUDA): no DeepSpeed op to compile, one pass per step
            "torch_adam": True, "fused": True}},
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        **({"fp16": FP16_LOSS_SCALING} if precision == "fp16" else {}),
        # half weights, fp32 gradient accumulation (DeepSpeed's default is the weights' dtype, which loses
        # the small gradients of a long accumulation); stages 1-3 honour it, stage 0 cannot (refused)
        **({"data_types": {"grad_accum_dtype": "fp32"}} if precision != "fp32" else {}),
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: TrainConfig, model_config: dict, start_state: dict | None = None,
                 load_universal: bool = False):
    """start_state: pretrained weights (training/pretrained.py), loaded before DeepSpeed wraps the model;
    load_universal: the engine will load a universal checkpoint (a resume at another world size)."""
    import deepspeed
    from model import build_model
    from torch.optim.lr_scheduler import LambdaLR
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(model_config)
    if start_state is not None:
        from training.pretrained import load_start_state
        load_start_state(model, start_state)
    model.set_attention(cfg.attention)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.weight_decay),
        config=merged(deepspeed_config(cfg), {"checkpoint": {"load_universal": True}} if load_universal else {}),
        lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(cfg)))
    if cfg.zero_stage == 0 and dist.get_world_size() == 1:
        engine.enable_backward_allreduce = False  # one rank: the gradient all-reduce only copies
    if cfg.compile:
        engine.compile()
    return engine


def grad_accum_dtype(engine) -> torch.dtype:
    """The dtype the engine's optimizer accumulates gradients in, read from the optimizer DeepSpeed built
    (ZeRO 1 + bf16: BF16_Optimizer's grad_acc_dtype; ZeRO 1-3 otherwise: gradient_accumulation_dtype;
    no wrapper: the parameters' dtype)."""
    opt = engine.optimizer
    for attr in ("grad_acc_dtype", "gradient_accumulation_dtype"):
        if getattr(opt, attr, None) is not None:
            return getattr(opt, attr)
    return next(engine.module.parameters()).dtype


def precision_summary(engine) -> str:
    """One line for train.log: what the weights, masters and gradient accumulation are held in."""
    params = next(engine.module.parameters()).dtype
    return (f"precision: parameters {str(params).removeprefix('torch.')}, gradients accumulate in "
            f"{str(grad_accum_dtype(engine)).removeprefix('torch.')}, optimizer "
            f"{type(engine.optimizer).__name__}, ZeRO {engine.zero_optimization_stage()}")


LOGIT_SCALE_MAX = math.log(100)


def clamp_logit_scale(engine):
    """logit_scale in [0, log 100] after every step, in the model copy and the fp32 master copy."""
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param,
                                 safe_set_full_fp32_param, safe_set_local_fp32_param)
    p = engine.module.logit_scale
    with torch.no_grad():
        if hasattr(p, "ds_id"):  # ZeRO-3: clamp this rank's shard (elementwise, no collective)
            p.ds_tensor.data.clamp_(0, LOGIT_SCALE_MAX)
            master = safe_get_local_fp32_param(p)
            if master is not None:
                safe_set_local_fp32_param(p, master.clamp(0, LOGIT_SCALE_MAX))
            return
        p.data.clamp_(0, LOGIT_SCALE_MAX)
        master = safe_get_full_fp32_param(p)  # ZeRO 1/2, bf16: a collective; None without a master
        if master is not None:
            safe_set_full_fp32_param(p, master.clamp(0, LOGIT_SCALE_MAX))
