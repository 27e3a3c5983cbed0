"""Train CLIP / LaCLIP / LaCLIP-MT / SLIP on DeepSpeed (ZeRO 0-3), on GPUs or on CPU with gloo.

    python train.py --config configs/train_tiny.yaml                                   # 1 rank
    deepspeed --num_gpus 2 train.py --config configs/train_tiny.yaml                   # 2 ranks, one machine
    deepspeed --hostfile configs/hostfile.example train.py --config configs/train_vit_b16_32k.yaml
    python train.py --config configs/train_tiny.yaml --set lr=1e-3 --set zero_stage=2 --resume latest

Global batch = micro_batch x ranks x accumulation. With accumulation > 1 every optimizer step still
sees the whole global batch as negatives (gradient cache): the features of all micro batches are
computed without grad and gathered, the contrastive loss and its gradient w.r.t. those features are
computed once on the global batch, then each micro batch is recomputed with grad and back-propagates
its slice of that feature gradient. SLIP's head (whose batch norm normalises over every row it sees)
runs once per step on the cached tower features of the whole batch. The result equals one big batch,
up to float rounding, for CLIP, LaCLIP, LaCLIP-MT and SLIP alike.

Writes <run_dir>/config.yaml, metrics.jsonl, train.log (text), tensorboard/, checkpoints/step-XXXXXXX/
(DeepSpeed, with export/: fp32 weights and the model config, also in open_clip's hub layout). `latest`
names a checkpoint only once every rank's files and the export are written. SIGTERM, or the death of the
launcher that started the ranks: checkpoint at the next step boundary, then exit 0. A non-finite loss
stops the run (exit 3) before the bad update. Problems found before the first step (an unwritable run
directory, a missing data_root or --resume checkpoint, a bad config) print one line and exit 2.
A run_dir that already holds a run is refused unless resuming; `--resume latest` starts fresh when
there is nothing to resume. keep_checkpoints=N keeps the newest N; eval_every=N runs zero-shot evaluation
(eval.py's code) on eval_datasets every N steps, logged beside the loss; the `deepspeed:` mapping of the
config is merged into the generated DeepSpeed config (any DeepSpeed option, its monitors included).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parent
# DeepSpeed JIT-compiles its shared-memory comm op on CPU (about a minute): compile once, reuse after.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402

EXIT_NONFINITE = 3
EXIT_USAGE = 2
CHECKPOINT_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass
class TrainConfig:
    # model
    model: str = "tiny"                  # a model/configs/<name>.json
    model_overrides: dict = dataclasses.field(default_factory=dict)  # merged into the model config
    # data
    data: str = "synthetic"              # synthetic | torch | ffcv | dali (loaders.build_loader kind)
    data_root: str = ""                  # packed dataset directory (loaders/pack)
    text_mode: str = "rewrite"           # original (CLIP) | rewrite (LaCLIP) | all (LaCLIP-MT)
    max_texts: int = 5                   # text slots per sample in text_mode=all
    mt_text_to_image: str = "all"        # LaCLIP-MT's text-to-image term: all texts | original caption
    image_loss: str = "clip"             # clip | slip (adds SimCLR on two views)
    ssl_weight: float = 1.0              # SLIP's weight of the SimCLR term
    augment: bool = True
    num_workers: int = 1
    synthetic_samples: int = 4096        # dataset size of data=synthetic
    # batch
    micro_batch: int = 8                 # per rank, per forward
    accumulation: int = 1                # micro batches per optimizer step (gradient cache)
    # engine
    zero_stage: int = 1
    precision: str = "fp32"              # fp32 | bf16
    grad_checkpointing: bool = False
    compile: bool = False                # torch.compile through DeepSpeed's engine.compile()
    # optimizer and schedule
    lr: float = 5e-4
    min_lr_ratio: float = 0.0            # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 100
    total_steps: int = 1000
    weight_decay: float = 0.2
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-8
    grad_clip: float = 1.0               # 0 = off
    # run
    seed: int = 0
    run_dir: str = "runs/default"
    checkpoint_every: int = 1000         # steps; 0 = only at the end and on SIGTERM
    keep_checkpoints: int = 0            # keep the newest N checkpoints (0 = all)
    eval_every: int = 0                  # zero-shot evaluation every N steps (0 = off)
    eval_datasets: str = ""              # comma-separated eval.py names, e.g. "imagenet1k,cifar10"
    eval_data_root: str = "data"
    eval_max_per_split: int = 0          # >0: a fixed subsample per split (quick checks)
    deepspeed: dict = dataclasses.field(default_factory=dict)  # merged into the generated DeepSpeed config
    stop_after: int = 0                  # stop (with a checkpoint) after this step; 0 = total_steps
    progress: bool = True                # tqdm bar on rank 0

    def validate(self):
        choices = {"data": ("synthetic", "torch", "ffcv", "dali"),
                   "text_mode": ("original", "rewrite", "all"), "image_loss": ("clip", "slip"),
                   "mt_text_to_image": ("all", "original"),
                   "precision": ("fp32", "bf16"), "zero_stage": (0, 1, 2, 3)}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config {key}={getattr(self, key)!r}: expected one of {allowed}")
        if self.data != "synthetic" and not self.data_root:
            raise ValueError(f"config data={self.data!r} needs data_root (a packed dataset directory)")
        for key in ("micro_batch", "accumulation", "total_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"config {key}={getattr(self, key)} must be >= 1")
        if len(self.betas) != 2:
            raise ValueError(f"config betas={self.betas}: expected two numbers")
        if self.eval_every and not self.eval_datasets:
            raise ValueError(f"config eval_every={self.eval_every} needs eval_datasets")


def _coerce(value, hint, key):
    """A YAML / command-line value -> the field's type (YAML reads 1e-3 as a string)."""
    origin = typing.get_origin(hint) or hint
    try:
        if origin is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if origin in (int, float, str):
            if origin is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return origin(float(value)) if origin is int and isinstance(value, str) and "e" in value \
                else origin(value)
        if origin is tuple:
            value = yaml.safe_load(value) if isinstance(value, str) else value
            return tuple(float(v) for v in value)
        if origin is dict:
            value = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError(value)
            return value
    except (TypeError, ValueError) as err:
        raise ValueError(f"config {key}: cannot read {value!r} as {origin.__name__}") from err
    return value


def load_config(path: str | None, overrides: list[str]) -> TrainConfig:
    """Defaults <- YAML file <- `key=value` overrides; unknown keys are errors."""
    hints = typing.get_type_hints(TrainConfig)
    values = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
        values.update(loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        values[key.strip()] = raw if hints.get(key.strip()) is str else yaml.safe_load(raw)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown config keys {unknown} (from {path or 'the command line'}); "
                         f"known: {sorted(hints)}")
    cfg = TrainConfig(**{k: _coerce(v, hints[k], k) for k, v in values.items()})
    cfg.validate()
    return cfg


def config_dict(cfg: TrainConfig) -> dict:
    out = dataclasses.asdict(cfg)
    out["betas"] = list(cfg.betas)
    return out


def merged(base: dict, override: dict) -> dict:
    """Nested dict update: model_overrides={vision_cfg: {qk_norm: true}} keeps the other vision keys."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_args(argv):
    import argparse  # noqa: PLC0415
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file of TrainConfig keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--resume", help="'latest' (this run_dir's newest checkpoint) or a checkpoint path")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from deepspeed
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- distributed

def init_distributed():
    """Ranks from the launcher (deepspeed, torchrun or srun: common/ranks.py); plain `python train.py` is
    one rank."""
    from common.ranks import RankError, export_torch_env, resolve_ranks  # noqa: PLC0415
    try:
        ranks = resolve_ranks()
        if ranks.source != "single":
            export_torch_env(ranks)
    except RankError as e:
        raise SystemExit(f"train.py: {e}") from None
    if ranks.source == "single":
        import socket  # noqa: PLC0415
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    import deepspeed  # noqa: PLC0415
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        # ranks on one machine share its cores (the launcher leaves OMP_NUM_THREADS unset)
        ranks_here = int(os.environ.get("LOCAL_SIZE") or 1)
        default = max(1, (os.cpu_count() or 1) // ranks_here)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or default))
        device = torch.device("cpu")
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(local_rank))
    deepspeed.init_distributed()  # gloo on CPU, nccl on CUDA
    return dist.get_rank(), dist.get_world_size(), device


def _comm_device():
    # NCCL reduces only GPU tensors, gloo CPU ones
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"


def all_mean(x: float) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------- launcher death and preflight

class UsageError(Exception):
    """A problem with the run's inputs, found before training: one line, exit EXIT_USAGE."""


def is_launcher(cmdline: list[str]) -> bool:
    """`deepspeed ...`, `python -m deepspeed.launcher.{runner,launch}`, `torchrun`, `-m torch.distributed.run`."""
    return any(os.path.basename(arg) in ("deepspeed", "torchrun")
               or arg.startswith(("deepspeed.launcher.", "torch.distributed.run")) for arg in cmdline)


def launcher_chain() -> list:
    """The launcher processes above this rank (deepspeed's runner and launch.py, torchrun), nearest first."""
    import psutil  # noqa: PLC0415
    chain, proc = [], psutil.Process().parent()
    while proc is not None and proc.pid > 1:
        try:
            if not is_launcher(proc.cmdline()):
                break
            chain.append(proc)
            proc = proc.parent()
        except psutil.Error:
            break
    return chain


def _alive(proc) -> bool:
    import psutil  # noqa: PLC0415
    try:  # is_running also compares the start time, so a reused pid counts as dead
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch_launcher(on_death, interval: float = 0.5):
    """Call on_death(description) once if any launcher above this rank exits.

    The deepspeed runner on one node installs no signal handler: SIGTERM kills it at once and its
    launch.py keeps the ranks running with nobody left to stop them. So each rank polls its whole
    launcher chain, and asks the kernel for SIGTERM (PR_SET_PDEATHSIG) when its direct parent dies.
    """
    chain = launcher_chain()
    if not chain:
        return
    if sys.platform.startswith("linux"):
        import ctypes  # noqa: PLC0415
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    def poll():
        while True:
            for proc in chain:
                if not _alive(proc):
                    on_death(f"launcher process {proc.pid} exited")
                    return
            time.sleep(interval)

    threading.Thread(target=poll, name="launcher-watch", daemon=True).start()


def preflight(cfg: TrainConfig, resume: str | None, rank: int) -> list[str]:
    """This rank's problems that would otherwise surface mid-run (at the first save, the first batch)."""
    problems = []
    run_dir = Path(cfg.run_dir)
    try:  # every rank writes its own optimizer shards under run_dir, so every rank checks
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}-{rank}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        problems.append(f"run_dir {run_dir}: cannot write checkpoints there ({err.strerror or err})")
    if cfg.data != "synthetic" and not Path(cfg.data_root).is_dir():
        problems.append(f"data_root {cfg.data_root}: no such directory (expected a packed dataset)")
    if resume:
        try:
            resolve_resume(resume, Path(cfg.run_dir))
        except FileNotFoundError as err:
            problems.append(str(err))
    return problems


def preflight_all_ranks(cfg: TrainConfig, resume: str | None, rank: int):
    """Every rank checks; every rank raises the same UsageError naming the problems and their ranks."""
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, preflight(cfg, resume, rank))
    by_problem = {}
    for r, problems in enumerate(found):
        for problem in problems:
            by_problem.setdefault(problem, []).append(r)
    if by_problem:
        raise UsageError("; ".join(f"{p} (rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})"
                                   for p, rs in by_problem.items()))


# ----------------------------------------------------------------------------- data

SOT, EOT, CONTEXT = 49406, 49407, 77


class SyntheticLoader:
    """Seeded random images and token sequences, a pure function of (seed, epoch, sample index).

    Same interface and sharding as loaders.build_loader: micro batch k of rank r holds positions
    k*world*B + r*B .. +B of the epoch's permutation, so one optimizer step covers the same global
    batch for every split into ranks x accumulation x micro batch (the step-equality tests use it).
    Sample i has 1 + i % max_texts texts; their content is random ids.
    """

    def __init__(self, cfg: TrainConfig, rank, world, image_size, epoch, start_batch):
        self.cfg, self.rank, self.world, self.size = cfg, rank, world, image_size
        self.epoch, self.start = epoch, start_batch
        self.perm = np.random.default_rng([cfg.seed, epoch, 7]).permutation(cfg.synthetic_samples)

    def batches_per_epoch(self) -> int:
        return self.cfg.synthetic_samples // (self.cfg.micro_batch * self.world)

    def __len__(self):  # batches left, like the loaders
        return max(0, self.batches_per_epoch() - self.start)

    def texts(self, i: int) -> np.ndarray:
        k = self.cfg.max_texts
        rng = np.random.default_rng([self.cfg.seed, int(i), 1])
        out = np.zeros((k, CONTEXT), dtype=np.int64)
        for j in range(1 + i % k):
            ids = rng.integers(1, SOT, size=rng.integers(3, 12))
            out[j, :len(ids) + 2] = [SOT, *ids, EOT]
        return out

    def sample(self, i: int) -> dict:
        cfg, s = self.cfg, self.size
        image = np.random.default_rng([cfg.seed, int(i), 0]).standard_normal((3, s, s), np.float32)
        texts = self.texts(i)
        n_texts = 1 + i % cfg.max_texts
        out = {"images": image}
        if cfg.text_mode == "all":
            out["tokens"], out["mask"] = texts, np.arange(cfg.max_texts) < n_texts
        else:
            pick = 0 if cfg.text_mode == "original" else \
                np.random.default_rng([cfg.seed, self.epoch, int(i), 2]).integers(n_texts)
            out["tokens"] = texts[pick]
        if cfg.image_loss == "slip":
            rng = np.random.default_rng([cfg.seed, self.epoch, int(i), 3])
            out["view1"] = image + 0.3 * rng.standard_normal(image.shape, np.float32)
            out["view2"] = image + 0.3 * rng.standard_normal(image.shape, np.float32)
        return out

    def __iter__(self):
        b = self.cfg.micro_batch
        for k in range(self.start, self.batches_per_epoch()):
            first = k * self.world * b + self.rank * b
            samples = [self.sample(int(i)) for i in self.perm[first:first + b]]
            yield {key: torch.from_numpy(np.stack([x[key] for x in samples])) for key in samples[0]}


def as_dict(batch) -> dict:
    """A loader batch (tuple or dict, see loaders.build_loader) -> {"images", "tokens", ["mask", "view1", ...]}."""
    if isinstance(batch, dict):
        return batch
    keys = ("images", "tokens", "mask")[:len(batch)]
    return dict(zip(keys, batch))


class MicroBatches:
    """This rank's endless stream of micro batches across epochs; (epoch, batch) is the position of
    the next unseen batch, which a checkpoint stores and a resumed run starts from."""

    def __init__(self, cfg: TrainConfig, rank, world, image_size, epoch=0, batch=0):
        self.cfg, self.rank, self.world, self.image_size = cfg, rank, world, image_size
        self.epoch, self.batch = epoch, batch
        self.it = None

    def _open(self):
        cfg = self.cfg
        if cfg.data == "synthetic":
            loader = SyntheticLoader(cfg, self.rank, self.world, self.image_size, self.epoch, self.batch)
        else:
            from loaders import build_loader  # noqa: PLC0415
            loader = build_loader(cfg.data, cfg.data_root, batch_size=cfg.micro_batch,
                                  text_mode=cfg.text_mode, seed=cfg.seed, epoch=self.epoch,
                                  rank=self.rank, world_size=self.world, num_workers=cfg.num_workers,
                                  image_size=self.image_size, max_texts=cfg.max_texts,
                                  slip_views=cfg.image_loss == "slip", start_batch=self.batch,
                                  drop_last=True, augment=cfg.augment)
        if self.batch == 0 and len(loader) == 0:
            raise ValueError(f"{cfg.data_root or 'synthetic data'}: fewer samples than one global "
                             f"micro batch ({cfg.micro_batch} x {self.world} ranks)")
        return iter(loader)

    def next(self, device, dtype) -> dict:
        while True:
            if self.it is None:
                self.it = self._open()
            try:
                batch = as_dict(next(self.it))
                break
            except StopIteration:
                self.epoch, self.batch, self.it = self.epoch + 1, 0, None
        self.batch += 1
        out = {}
        for key, value in batch.items():
            if key in ("images", "view1", "view2"):
                out[key] = value.to(device, dtype, non_blocking=True)
            elif key in ("tokens", "mask"):
                out[key] = value.to(device, torch.bool if key == "mask" else torch.long)
        return out


# ----------------------------------------------------------------------------- model, optimizer

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


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The generated DeepSpeed config with the run config's `deepspeed:` mapping merged over it."""
    return merged(_generated_deepspeed_config(cfg), cfg.deepspeed)


def _generated_deepspeed_config(cfg: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.accumulation,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay,
            # torch's fused AdamW kernel (CPU and CUDA): no DeepSpeed op to compile, one pass per step
            "torch_adam": True, "fused": True}},
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: TrainConfig, model_config: dict):
    import deepspeed  # noqa: PLC0415
    from model import build_model  # noqa: PLC0415
    from torch.optim.lr_scheduler import LambdaLR  # noqa: PLC0415
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(model_config)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.weight_decay),
        config=deepspeed_config(cfg), lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(cfg)))
    if cfg.zero_stage == 0 and dist.get_world_size() == 1:
        engine.enable_backward_allreduce = False  # one rank: the gradient all-reduce only copies
    if cfg.compile:
        engine.compile()
    return engine


LOGIT_SCALE_MAX = math.log(100)


def clamp_logit_scale(engine):
    """logit_scale in [0, log 100] after every step, in the model copy and the fp32 master copy."""
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param,  # noqa: PLC0415
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


# ----------------------------------------------------------------------------- the step

class NonFiniteLoss(RuntimeError):
    pass


def forward(engine, batch: dict, cfg: TrainConfig, ssl_head: bool = True):
    """One micro batch -> (features dict of [b, ...] tensors, exponentiated logit scale).
    SLIP's views: their head embeddings "ssl1", "ssl2"; with ssl_head=False the pooled tower features
    "pool1", "pool2" instead, for the gradient cache to run the head once on the whole batch."""
    image_features, text_features, scale = engine(batch["images"], batch["tokens"])
    feats = {"image": image_features, "text": text_features}
    if cfg.image_loss == "slip":
        for v in ("1", "2"):
            if ssl_head:
                feats["ssl" + v] = engine.module.encode_image_ssl(batch["view" + v])
            else:
                feats["pool" + v] = engine.module.visual(batch["view" + v], pooled=True)
    return feats, scale


@contextlib.contextmanager
def running_stats_kept(module):
    """Batch-norm running statistics as they were before the block (the block's forward and backward)."""
    saved = [b.clone() for b in module.buffers()]
    yield
    with torch.no_grad():
        for buffer, value in zip(module.buffers(), saved):
            buffer.copy_(value)


def slip_head(engine, pooled: torch.Tensor) -> torch.Tensor:
    """SLIP's MLP head on pooled features. Its batch norm normalises over every row it is given (and
    over the ranks), so the gradient cache calls it on the whole accumulated batch."""
    head = engine.module.image_mlp
    return head(pooled.to(next(head.parameters()).dtype))


def contrastive_loss(feats: dict, scale, mask, cfg: TrainConfig, losses: dict):
    """This rank's rows against the global batch (model.losses gathers across ranks), in fp32."""
    f = {k: v.float() for k, v in feats.items()}
    scale = scale.float()
    if cfg.text_mode == "all":
        loss = losses["mt"](f["image"], f["text"], mask, scale)
    else:
        loss = losses["clip"](f["image"], f["text"], scale)
    if cfg.image_loss == "slip":
        loss = loss + cfg.ssl_weight * losses["simclr"](f["ssl1"], f["ssl2"])
    return loss


def train_step(engine, micro: list[dict], cfg: TrainConfig, losses: dict, step: int):
    """One optimizer step over the micro batches; returns (global loss, logit scale).
    Raises NonFiniteLoss before any gradient is applied."""
    if len(micro) == 1:  # no accumulation: the plain path, no recompute
        feats, scale = forward(engine, micro[0], cfg)
        loss = contrastive_loss(feats, scale, micro[0].get("mask"), cfg, losses)
        global_loss = all_mean(loss.item())
        if not math.isfinite(global_loss):
            raise NonFiniteLoss(step)
        engine.backward(loss)
        engine.step()
        return global_loss, scale.item()

    slip = cfg.image_loss == "slip"
    # 1. features of every micro batch without grad: the global batch's negatives
    with torch.no_grad():
        outs = [forward(engine, b, cfg, ssl_head=False) for b in micro]
    keys = list(outs[0][0])
    cache = {k: torch.cat([o[0][k] for o in outs]).float().requires_grad_() for k in keys}
    scale = outs[0][1].detach().float().requires_grad_()
    mask = torch.cat([b["mask"] for b in micro]) if cfg.text_mode == "all" else None
    # 2. the loss on the whole batch and its gradient w.r.t. the cached features (and the scale);
    # SLIP's head runs here on the whole batch, so its batch norm sees what one big batch would
    feats = dict(cache)
    heads = ["ssl1", "ssl2"] if slip else []
    # the step's running-statistics update is the head's second call, in step 3: once, like one batch
    with running_stats_kept(engine.module.image_mlp) if slip else contextlib.nullcontext():
        for k in heads:
            feats[k] = slip_head(engine, cache["pool" + k[-1]])
        loss = contrastive_loss(feats, scale, mask, cfg, losses)
        grads = torch.autograd.grad(loss, [cache[k] for k in keys] + [feats[k] for k in heads] + [scale])
    global_loss = all_mean(loss.item())
    if not math.isfinite(global_loss):
        raise NonFiniteLoss(step)
    feat_grads, scale_grad = dict(zip(keys + heads, grads[:-1])), grads[-1]
    # 3. recompute each micro batch with grad and push its slice of the feature gradient through
    start = 0
    for m, b in enumerate(micro):
        feats, s = forward(engine, b, cfg, ssl_head=False)
        n = feats["image"].shape[0]
        surrogate = sum((feats[k].float() * feat_grads[k][start:start + n]).sum() for k in keys)
        if m == 0:  # d loss / d scale, and d loss / d (SLIP head weights), enter once per step
            surrogate = surrogate + (s.float() * scale_grad).sum()
            for k in heads:
                head_out = slip_head(engine, cache["pool" + k[-1]].detach())
                surrogate = surrogate + (head_out.float() * feat_grads[k]).sum()
        engine.backward(surrogate, scale_wrt_gas=False)  # already the gradient of the step's loss
        engine.step()
        start += n
    return global_loss, outs[0][1].item()


# ----------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state().tolist(), "python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def full_fp32_state_dict(engine) -> dict:
    """Consolidated fp32 weights (collective: every rank calls it; the values are on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415
    sd = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        sd[name] = (full if full is not None else p.detach()).float().cpu().clone()
    for name, b in engine.module.named_buffers():
        sd[name] = b.detach().cpu().clone()
    return sd


def save_checkpoint(engine, cfg: TrainConfig, model_config: dict, step: int, data: MicroBatches,
                    rank: int) -> Path:
    from model import build_model  # noqa: PLC0415
    from model.checkpoint import save_export  # noqa: PLC0415
    root = Path(cfg.run_dir) / "checkpoints"
    tag = f"step-{step:07d}"
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())
    client = {"format_version": CHECKPOINT_FORMAT_VERSION, "step": step, "epoch": data.epoch,
              "batch_in_epoch": data.batch, "rng": rngs, "config": config_dict(cfg)}
    # DeepSpeed writes `latest` before the other ranks finish their shards; we move it ourselves, last
    engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
    sd = full_fp32_state_dict(engine)
    if rank == 0:
        model = build_model(model_config)
        model.load_state_dict(sd)
        save_export(model, model_config, root / tag / "export")
    dist.barrier()  # every rank's files are written
    if rank == 0:
        write_latest(root, tag)
    if rank == 0 and cfg.keep_checkpoints:
        prune_checkpoints(root, cfg.keep_checkpoints)
    dist.barrier()
    return root / tag


def write_latest(root: Path, tag: str):
    """Point <root>/latest at tag atomically: a kill leaves the old pointer or the new, never half."""
    tmp = root / f".latest.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "latest")


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step-XXXXXXX checkpoints (never the one `latest` names)."""
    import shutil  # noqa: PLC0415
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    tags = sorted(p for p in root.glob("step-*") if p.is_dir())
    doomed = [p for p in tags[:-keep] if p.name != latest]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "train.log", "checkpoints", "tensorboard")


def refuse_existing_run(run_dir: Path, resuming: bool) -> None:
    """A new run must not overwrite another's outputs (metrics.jsonl would be truncated)."""
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if found and not resuming:
        raise SystemExit(f"train.py: {run_dir} already holds a run ({', '.join(found)}); continue it with "
                         "--resume latest or choose another run_dir")


def zeroshot_eval(engine, cfg: TrainConfig, model_config: dict, sets: list, rank: int, device) -> dict:
    """Zero-shot top-1 / top-5 / mean per-class of the current weights on `sets`, through eval.py's
    evaluation code (collective: every rank gathers the weights; rank 0 evaluates)."""
    from model import build_model  # noqa: PLC0415
    sd = full_fp32_state_dict(engine)
    out = {}
    if rank == 0:
        from evaluation import runner as E  # noqa: PLC0415
        model = build_model(model_config)
        model.load_state_dict(sd)
        model = model.to(device).eval()
        ecfg = E.EvalConfig(protocols=["zeroshot"], cache_dir="", workers=0, seed=cfg.seed,
                            max_per_split=cfg.eval_max_per_split)
        for ds in sets:
            zs = E.evaluate_set(model, ds, ecfg, "", str(device))["zeroshot"]
            out.update({f"zeroshot/{ds.name}/{k}": v for k, v in zs.items() if k != "accuracy"})
    dist.barrier()
    return out


def resolve_resume(spec: str, run_dir: Path) -> tuple[Path, str] | None:
    """'latest' or a path (checkpoints dir, or a tag dir) -> (DeepSpeed load dir, tag); None for 'latest'
    when run_dir has no checkpoint yet (a fresh start, as open_clip's --resume latest)."""
    path = run_dir / "checkpoints" if spec == "latest" else Path(spec)
    if spec == "latest" and not (path / "latest").is_file():
        return None
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if (path / "mp_rank_00_model_states.pt").is_file() or path.name.startswith("step-"):
        return path.parent, path.name
    raise FileNotFoundError(f"--resume {spec}: no checkpoint at {path} (no 'latest' file and not a "
                            "step-XXXXXXX directory)")


# ----------------------------------------------------------------------------- logging

class Logger:
    """metrics.jsonl + TensorBoard + a tqdm bar, rank 0 only."""

    def __init__(self, cfg: TrainConfig, rank: int, start_step: int):
        self.active = rank == 0
        if not self.active:
            return
        run_dir = Path(cfg.run_dir)
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # a resumed run rewrites the steps after its checkpoint
            kept = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) <= start_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        self.text = open(run_dir / "train.log", "a")
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        end = cfg.stop_after or cfg.total_steps
        from tqdm import tqdm  # noqa: PLC0415
        self.bar = tqdm(total=end, initial=start_step, desc="train", unit="step",
                        disable=not cfg.progress, dynamic_ncols=True)

    def note(self, message: str):
        """A line in <run_dir>/train.log (rank 0)."""
        if self.active:
            self.text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            self.text.flush()

    def log(self, row: dict):
        if not self.active:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.note(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items() if k != "time"))
        for key in ("loss", "lr", "logit_scale", "grad_norm", "samples_per_s", "data_wait"):
            if row.get(key) is not None:
                self.tb.add_scalar(f"train/{key}", row[key], row["step"])
        for key in (k for k in row if k.startswith("zeroshot/")):
            self.tb.add_scalar(key, row[key], row["step"])
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                             sps=f"{row['samples_per_s']:.1f}", wait=f"{row['data_wait']:.2f}")
        self.bar.update(1)

    def close(self):
        if self.active:
            self.bar.close()
            self.tb.close()
            self.file.close()
            self.text.close()


def _step_of(line: str) -> float:
    """A metrics.jsonl line's step; inf for a torn line (a kill mid-write), which is then dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    # first: a launcher that dies while this rank starts up is reparented away from the chain
    stop_requested = {"reason": None}

    def on_launcher_death(what: str):
        print(f"train: rank {os.environ.get('RANK', 0)}: {what}; stopping with a checkpoint at the next "
              "step", flush=True)
        stop_requested.update(reason="the launcher's exit")
    watch_launcher(on_launcher_death)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.set)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise UsageError(err) from err
    rank, world, device = init_distributed()
    preflight_all_ranks(cfg, args.resume, rank)
    run_dir = Path(cfg.run_dir)
    from model import get_model_config  # noqa: PLC0415
    from model.losses import ClipLoss, LaClipMTLoss, SimClrLoss  # noqa: PLC0415
    model_config = merged(get_model_config(cfg.model), cfg.model_overrides)
    model_config["grad_checkpointing"] = cfg.grad_checkpointing
    if cfg.image_loss == "slip":
        model_config["slip"] = True
    resume_from = resolve_resume(args.resume, run_dir) if args.resume else None  # fail before the build
    refuse_existing_run(run_dir, resuming=args.resume is not None)
    dist.barrier()  # every rank has looked before rank 0 writes
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / ".config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
        os.replace(tmp, run_dir / "config.yaml")

    eval_sets = []
    if cfg.eval_every:  # open the sets now: a missing one fails before the build
        from evaluation.datasets import open_eval_set  # noqa: PLC0415
        eval_sets = [open_eval_set(n, cfg.eval_data_root) for n in cfg.eval_datasets.split(",") if n.strip()]
    engine = build_engine(cfg, model_config)
    image_size = engine.module.image_size
    losses = {"clip": ClipLoss(), "mt": LaClipMTLoss(cfg.mt_text_to_image), "simclr": SimClrLoss()}

    step, epoch, batch_in_epoch = 0, 0, 0
    last_checkpoint = None
    if resume_from:
        load_dir, tag = resume_from
        path, client = engine.load_checkpoint(str(load_dir), tag=tag)
        if path is None:
            raise FileNotFoundError(f"--resume {args.resume}: DeepSpeed could not load {load_dir}/{tag}")
        step, epoch, batch_in_epoch = client["step"], client["epoch"], client["batch_in_epoch"]
        set_rng_state(client["rng"][rank % len(client["rng"])])
        last_checkpoint = Path(load_dir) / tag
    else:
        torch.manual_seed(cfg.seed * 1000 + rank)  # per-rank streams for anything random below
    data = MicroBatches(cfg, rank, world, image_size, epoch, batch_in_epoch)

    signal.signal(signal.SIGTERM, lambda *_: stop_requested.update(reason="SIGTERM"))
    end_step = min(cfg.stop_after or cfg.total_steps, cfg.total_steps)
    logger = Logger(cfg, rank, step)
    logger.note(f"start: {world} rank(s), global batch {cfg.micro_batch * cfg.accumulation * world}, "
                + (f"resumed from {last_checkpoint} at step {step}" if resume_from else
                   ("--resume latest: nothing to resume, starting fresh" if args.resume else "fresh run"))
                + f"; config {run_dir / 'config.yaml'}")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    global_batch = cfg.micro_batch * cfg.accumulation * world
    status, exit_code = "finished", 0
    try:
        while step < end_step:
            t0 = time.perf_counter()
            micro = [data.next(device, dtype) for _ in range(cfg.accumulation)]
            t_data = time.perf_counter() - t0
            lr = engine.get_lr()[0]
            try:
                loss, scale = train_step(engine, micro, cfg, losses, step + 1)
            except NonFiniteLoss:
                where = last_checkpoint or "none (no checkpoint written yet)"
                msg = f"non-finite loss at step {step + 1}; last good checkpoint: {where}"
                if rank == 0:
                    print(f"ERROR: {msg}", file=sys.stderr, flush=True)
                status, exit_code = msg, EXIT_NONFINITE
                break
            grad_norm = engine.get_global_grad_norm()  # before clipping; None at ZeRO 0
            clamp_logit_scale(engine)
            step += 1
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": loss, "lr": lr, "logit_scale": scale,
                   "grad_norm": None if grad_norm is None else float(grad_norm),
                   "samples_per_s": global_batch / dt, "data_wait": t_data / dt, "epoch": data.epoch,
                   "time": time.time()}
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == end_step):
                row.update(zeroshot_eval(engine, cfg, model_config, eval_sets, rank, device))
            logger.log(row)
            stopping = any_rank(stop_requested["reason"] is not None)
            if stopping or step == end_step or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                last_checkpoint = save_checkpoint(engine, cfg, model_config, step, data, rank)
            if stopping:
                status = f"stopped by {stop_requested['reason'] or 'another rank'} after step {step}"
                break
    finally:
        logger.note(f"end: {status}; step {step}/{cfg.total_steps}; last checkpoint: {last_checkpoint}")
        logger.close()
    if rank == 0:
        print(f"train: {status}; step {step}/{cfg.total_steps}; last checkpoint: {last_checkpoint}",
              flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return exit_code


def cli() -> int:
    try:
        return main()
    except UsageError as err:  # the same on every rank: rank 0 says it once
        if os.environ.get("RANK", "0") == "0":
            print(f"train: error: {err}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(cli())
