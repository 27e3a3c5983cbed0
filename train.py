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
(DeepSpeed's files, config.json: the model config, and export/: the fp32 weights and configs
in open_clip's hub layout, one weights file). `latest`
names a checkpoint only once every rank's files and the export are written. SIGTERM, or the death of the
launcher that started the ranks: checkpoint at the next step boundary, then exit 0. A non-finite loss
stops the run (exit 3) before the bad update. Problems found before the first step (an unwritable run
directory, a data_root that is not a pack or an unreadable URL, a missing or empty --resume checkpoint, a
missing eval set, a bad config, a launch without a rank) print one line and exit 2, as does a run_dir that
already holds a run, unless resuming, and a data error met during training (a corrupt record: every rank stops with the
PackError's line naming tar, sample and key); `--resume latest` starts fresh when
there is nothing to resume. keep_checkpoints=N keeps the newest N; eval_every=N runs zero-shot evaluation
(eval.py's code) on eval_datasets every N steps, logged beside the loss; the `deepspeed:` mapping of the
config is merged into the generated DeepSpeed config (any DeepSpeed option, its monitors included).

This file is the run from start to end: config -> ranks -> preflight -> the step -> main. Its parts live in
training/ (config.py: the keys, which `--help` lists; engine.py, data.py, checkpoints.py, logger.py),
loaders/synthetic.py (data=synthetic) and common/processes.py (launcher watching).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
# DeepSpeed JIT-compiles its shared-memory comm op on CPU (about a minute): compile once, reuse after.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402

from common.config import ConfigError, flag_values, merged  # noqa: E402
from common.io import write_atomic  # noqa: E402
from common.processes import watch_launcher  # noqa: E402
from training.checkpoints import (full_fp32_state_dict, refuse_existing_run, resolve_resume,  # noqa: E402
                                  save_checkpoint, set_rng_state)
from training.config import TrainConfig, config_dict, load_config  # noqa: E402
from training.data import DataError, MicroBatches, dataset_samples  # noqa: E402
from training.elastic import ElasticError, data_position, prepare_resume, saved_world  # noqa: E402
from training.engine import build_engine, clamp_logit_scale, precision_summary, run_precision  # noqa: E402
from training.logger import Logger  # noqa: E402

EXIT_NONFINITE = 3
EXIT_USAGE = 2


# ----------------------------------------------------------------------------- config

def parse_args(argv):
    from common.config import build_parser
    # the alias flags (--batch-size, --lr, --epochs, --precision, --name, --logs, --workers, --wd, --warmup,
    # --seed, --report-to: open_clip_train's) are declared beside their keys in training/config.py
    p = build_parser(TrainConfig, "train.py", __doc__.split("\n")[0], flags="declared")
    p.add_argument("--resume", help="'latest' (this run_dir's newest checkpoint) or a checkpoint path")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from deepspeed
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- distributed

def init_distributed(timeout_s: float | None = None):
    """Ranks from the launcher (deepspeed, torchrun or srun: common/ranks.py); plain `python train.py` is
    one rank. timeout_s: every collective's timeout (None: DeepSpeed's default)."""
    from common.ranks import RankError, export_torch_env, free_port, resolve_ranks
    try:
        ranks = resolve_ranks()
        if ranks.source != "single":
            export_torch_env(ranks)
    except RankError as e:
        raise UsageError(e) from None
    if ranks.source == "single":
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    import deepspeed
    from deepspeed.accelerator import get_accelerator
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
    from datetime import timedelta
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(**timeout)  # gloo on CPU, nccl on CUDA
    if accel.device_name() == "cpu":
        release_shm_allreduce_buffer()
    return dist.get_rank(), dist.get_world_size(), device


def release_shm_allreduce_buffer():
    """DeepSpeed's CPU backend maps a 69 MB /dev/shm segment per rank (for inference_all_reduce, which
    training never calls) and never unlinks it: every run on one machine would leave one per rank until
    /dev/shm fills. Once every rank has mapped its peers' segments, each unlinks its own (the mappings stay
    valid), so none outlives the run, even one killed with -9 after start-up."""
    env = os.environ
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{dist.get_rank()}")
    dist.barrier()
    Path("/dev/shm", name).unlink(missing_ok=True)


def _comm_device():
    # NCCL reduces only GPU tensors, gloo CPU ones
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"


def all_mean(x: float) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


STOP_REASONS = (None, "SIGTERM", "the launcher's exit")  # reduced by index, so every rank learns why


def stop_reason_of_any_rank(reason: str | None) -> str | None:
    """Why some rank has to stop (the highest-index reason any rank holds), or None: the rank that
    prints the status may not be the one whose watcher noticed."""
    t = torch.tensor([STOP_REASONS.index(reason)], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return STOP_REASONS[int(t.item())]


# ----------------------------------------------------------------------------- preflight

class UsageError(Exception):
    """A problem with the run's inputs, found before training: one line, exit EXIT_USAGE."""


def preflight(cfg: TrainConfig, resume: str | None, rank: int, device) -> list[str]:
    """This rank's problems that would otherwise surface mid-run (at the first save, the first batch). A
    remote data_root is copied here (one process per cache folder downloads, the others wait) and
    cfg.data_root becomes the local copy; config.yaml keeps the URL."""
    problems = []
    if cfg.attention == "xformers":
        from model.attention import xformers_problem
        problem = xformers_problem(device)
        if problem:
            problems.append(f"attention=xformers: {problem}; attention=auto or sdpa runs SDPA")
    run_dir = Path(cfg.run_dir)
    try:  # every rank writes its own optimizer shards under run_dir, so every rank checks
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}-{rank}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        problems.append(f"run_dir {run_dir}: cannot write checkpoints there ({err.strerror or err})")
    from common.io import RemoteError, is_url
    if cfg.data != "synthetic" and is_url(cfg.data_root):  # every rank reads the node's local copy
        from common.remote_copy import local_copy
        try:
            cfg.data_root = str(local_copy(cfg.data_root))
        except RemoteError as err:
            return problems + [f"data_root {err}"]
    if cfg.data != "synthetic" and not Path(cfg.data_root).is_dir():
        problems.append(f"data_root {cfg.data_root}: no such directory (expected a packed dataset)")
    elif cfg.data != "synthetic":
        from loaders.packed import PackError, read_meta
        try:  # meta.json and file sizes only: cheap
            read_meta(cfg.data_root)
        except PackError as err:
            problems.append(f"data_root {cfg.data_root}: not a packed dataset ({err})")
    try:
        if resume:
            resolve_resume(resume, Path(cfg.run_dir))
        refuse_existing_run(run_dir, resuming=resume is not None)
    except (FileNotFoundError, FileExistsError) as err:
        problems.append(str(err))
    return problems


def preflight_all_ranks(cfg: TrainConfig, resume: str | None, rank: int, device):
    """Every rank checks; every rank raises the same UsageError naming the problems and their ranks."""
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, preflight(cfg, resume, rank, device))
    by_problem = {}
    for r, problems in enumerate(found):
        for problem in problems:
            by_problem.setdefault(problem, []).append(r)
    if by_problem:
        raise UsageError("; ".join(f"{p} (rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})"
                                   for p, rs in by_problem.items()))


# ----------------------------------------------------------------------------- the step's data

def step_batches(data: MicroBatches, cfg: TrainConfig, device, dtype) -> tuple[list | None, str | None]:
    """(this step's micro batches, None), or (None, the one line of the data error this rank met: a
    corrupt record's PackError names tar, sample and key)."""
    from loaders.packed import PackError
    from loaders.caption_codec import StoreError
    try:
        return [data.next(device, dtype) for _ in range(cfg.accumulation)], None
    except (PackError, StoreError, DataError) as err:
        return None, str(err)


def data_error_of_any_rank(error: str | None) -> str | None:
    """The data error of the lowest rank that met one, on every rank, or None (collective): a rank that
    raised alone would leave the others waiting in the step's all-reduce until the launcher kills them."""
    t = torch.tensor([error is not None], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if not t.item():
        return None
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next(f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None)


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


# ----------------------------------------------------------------------------- evaluation during training

def eval_wait_group(cfg: TrainConfig):
    """A gloo group for the other ranks to wait in while rank 0 evaluates, with its own timeout
    (eval_timeout_s): a long evaluation must not hit the collective timeout of the main group (every
    rank calls this, once)."""
    from datetime import timedelta
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.eval_timeout_s))


def zeroshot_eval(engine, cfg: TrainConfig, model_config: dict, sets: list, rank: int, device,
                  wait_group=None) -> dict:
    """Zero-shot top-1 / top-5 / mean per-class of the current weights on `sets`, through eval.py's
    evaluation code (collective: every rank gathers the weights; rank 0 evaluates while the others wait
    in `wait_group`, outside the collective timeout)."""
    from model import build_model
    sd = full_fp32_state_dict(engine)
    out = {}
    start = time.perf_counter()
    if rank == 0:
        from evaluation import runner as E
        model = build_model(model_config)
        model.load_state_dict(sd)
        model = model.to(device).eval()
        ecfg = E.EvalConfig(protocols=["zeroshot"], cache_dir="", workers=0, seed=cfg.seed,
                            max_per_split=cfg.eval_max_per_split, progress=cfg.progress)
        for ds in sets:
            zs = E.evaluate_set(model, ds, ecfg, "", str(device))["zeroshot"]
            out.update({f"zeroshot/{ds.name}/{k}": v for k, v in zs.items() if k != "accuracy"})
        out["zeroshot/seconds"] = time.perf_counter() - start
    dist.barrier(group=wait_group)
    return out


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
        cfg = load_config(args.config, args.set, flag_values(TrainConfig, args))
        precision = run_precision(cfg.precision)  # fp16 where the accelerator has none: before any rank starts
    except ConfigError as err:
        raise UsageError(err) from err
    rank, world, device = init_distributed(cfg.collective_timeout_s)
    data_root_given = cfg.data_root  # a remote data_root is replaced by its local copy next
    preflight_all_ranks(cfg, args.resume, rank, device)
    if cfg.epochs:  # open_clip's --epochs: the schedule's length from the data's size and the global batch
        cfg = dataclasses.replace(cfg, total_steps=math.ceil(
            cfg.epochs * dataset_samples(cfg) / (cfg.micro_batch * cfg.accumulation * world)))
    run_dir = Path(cfg.run_dir)
    from model import get_model_config
    from model.losses import ClipLoss, LaClipMTLoss, SimClrLoss
    model_config = merged(get_model_config(cfg.model), cfg.model_overrides)
    model_config["grad_checkpointing"] = cfg.grad_checkpointing
    if cfg.image_loss == "slip":
        model_config["slip"] = True
    resume_from = resolve_resume(args.resume, run_dir) if args.resume else None  # fail before the build
    from training.pretrained import PretrainedError, start_weights
    try:  # before config.yaml, which records the file's sha256
        start_state, pretrained_note = start_weights(cfg, model_config, resuming=resume_from is not None)
    except PretrainedError as err:
        raise UsageError(err) from None
    eval_sets = []
    if cfg.eval_every:  # open the sets now: a missing one fails before the build and before config.yaml
        from evaluation.datasets import DatasetError, open_eval_set
        try:
            eval_sets = [open_eval_set(n, cfg.eval_data_root) for n in cfg.eval_datasets.split(",") if n.strip()]
        except DatasetError as err:
            raise UsageError(f"eval_datasets: {err}") from None
    dist.barrier()  # every rank has looked (preflight: refuse_existing_run) before rank 0 writes
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        as_run = {**config_dict(cfg), "data_root": data_root_given}  # with pretrained_sha256, the URL given
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(as_run, sort_keys=False))
    wait_group = eval_wait_group(cfg) if cfg.eval_every else None  # every rank creates it, once
    how_resumed = None  # a checkpoint of another world size: how it was converted (training/elastic.py)
    if resume_from:
        try:
            *resume_from, how_resumed = prepare_resume(*resume_from, rank, world)
        except ElasticError as err:
            raise UsageError(err) from None
    engine = build_engine(cfg, model_config, start_state, load_universal=how_resumed is not None)
    del start_state
    image_size = engine.module.image_size
    losses = {"clip": ClipLoss(), "mt": LaClipMTLoss(cfg.mt_text_to_image), "simclr": SimClrLoss()}

    step, epoch, batch_in_epoch, remaining = 0, 0, 0, None
    last_checkpoint, world_note = None, None
    if resume_from:
        load_dir, tag = resume_from
        path, client = engine.load_checkpoint(str(load_dir), tag=tag)
        if path is None:
            raise FileNotFoundError(f"--resume {args.resume}: DeepSpeed could not load {load_dir}/{tag}")
        try:
            epoch, batch_in_epoch, remaining = data_position(client, cfg, world)
        except ElasticError as err:
            raise UsageError(err) from None
        step = client["step"]
        set_rng_state(client["rng"][rank % len(client["rng"])])
        last_checkpoint = Path(load_dir) / tag
        if saved_world(client) != world:
            world_note = (f"world size changed from {saved_world(client)} to {world} rank(s): "
                          f"{how_resumed or 'ZeRO 0 holds the whole optimizer state, loaded as it is'}; data "
                          f"position {client['batch_in_epoch']} x {client['config']['micro_batch']} x "
                          f"{saved_world(client)} -> " + (
                              f"{batch_in_epoch} x {cfg.micro_batch} x {world} samples into epoch {epoch}"
                              if remaining is None or client["batch_in_epoch"] == 0 else
                              f"the {sum(b - a for a, b in remaining)} samples epoch {epoch} has left, "
                              f"re-sliced over {world} rank(s)"))
    else:
        torch.manual_seed(cfg.seed * 1000 + rank)  # per-rank streams for anything random below
    data = MicroBatches(cfg, rank, world, image_size, epoch, batch_in_epoch, remaining)

    signal.signal(signal.SIGTERM, lambda *_: stop_requested.update(reason="SIGTERM"))
    end_step = min(cfg.stop_after or cfg.total_steps, cfg.total_steps)
    logger = Logger(cfg, rank, step, monitor=engine.monitor)
    logger.note(f"start: {world} rank(s), global batch {cfg.micro_batch * cfg.accumulation * world}, "
                + (f"resumed from {last_checkpoint} at step {step}" if resume_from else
                   ("--resume latest: nothing to resume, starting fresh" if args.resume else "fresh run"))
                + f"; config {run_dir / 'config.yaml'}")
    logger.note(precision_summary(engine))
    if pretrained_note:
        logger.note(pretrained_note)
    if world_note:
        logger.note(world_note)
        if rank == 0:
            print(f"train: {world_note}", flush=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    global_batch = cfg.micro_batch * cfg.accumulation * world
    status, exit_code = "finished", 0
    attention_noted = False
    try:
        while step < end_step:
            t0 = time.perf_counter()
            micro, data_error = step_batches(data, cfg, device, dtype)
            t_data = time.perf_counter() - t0
            data_error = data_error_of_any_rank(data_error)
            if data_error:  # every rank stops with the one line, not with torch's distributed traceback
                status, exit_code = f"stopped by a data error ({data_error})", EXIT_USAGE
                if rank == 0:
                    print(f"train: error: {data_error}", file=sys.stderr, flush=True)
                break
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
            if not attention_noted:  # which kernel each tower ran, and why: once per run
                from model.attention import describe
                logger.note(f"attention: {describe()}")
                attention_noted = True
            grad_norm = engine.get_global_grad_norm()  # before clipping; None at ZeRO 0
            clamp_logit_scale(engine)
            step += 1
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": loss, "lr": lr, "logit_scale": scale,
                   "grad_norm": None if grad_norm is None else float(grad_norm),
                   "samples_per_s": global_batch / dt, "data_wait": t_data / dt, "epoch": data.epoch,
                   "time": time.time()}
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == end_step):
                row.update(zeroshot_eval(engine, cfg, model_config, eval_sets, rank, device, wait_group))
            logger.log(row, samples=engine.global_samples)
            stop_reason = stop_reason_of_any_rank(stop_requested["reason"])
            if stop_reason or step == end_step or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                last_checkpoint = save_checkpoint(engine, cfg, model_config, step, data, rank)
            if stop_reason:
                status = f"stopped by {stop_reason} after step {step}"
                break
    finally:
        logger.note(f"end: {status}; step {step}/{cfg.total_steps}; last checkpoint: {last_checkpoint}")
        logger.close(exit_code)
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
