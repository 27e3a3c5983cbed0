"""Training-step benchmark: our trainer against open_clip's model in a plain PyTorch loop.

    python -m benchmarks train --out train.json                     # CPU default: ViT-S-16, batch 8
    python -m benchmarks train --model ViT-B-16 --micro-batch auto  # GPU: largest batch that fits

Both sides run one full training step per iteration (forward, loss, backward, gradient clipping,
AdamW step, logit-scale clamp) on the same model config, the same micro batch and the same fixed
in-memory batch. Ours is train.py's path: a DeepSpeed engine (ZeRO `--zero-stage`, one rank) and
train.train_step; open_clip's is its CLIP model, its ClipLoss and torch.optim.AdamW (autocast for
bf16, its amp_bf16 recipe). Rates: both sides built in one process and stepped alternately, one step
each, steps x repeats times after warmup; the median step time counts (a shared machine's load drifts
over seconds, alternation spreads it over both sides). Peak memory: each side alone in a fresh process
(peak RSS on CPU, torch.cuda.max_memory_allocated on GPU).

data_wait_fraction: our trainer fed by a real loader (the fastest of --loaders on a small packed set of
real emoji images, or --data-root) for --data-steps steps: time waiting for batches / step time.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from benchmarks.common import parse_config
from common.config import option

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class TrainBenchOptions:
    out: str | None = option(None, help="where to write the JSON result")
    model: str | None = option(None, help="model/configs name (default ViT-S-16 on CPU, ViT-B-16 on GPU)")
    micro_batch: str | None = option(None, help="samples per step, or 'auto' (GPU: largest power of two both "
                                     "sides fit); default 8 on CPU, auto on GPU")
    precision: str | None = option(None, choices=("fp32", "bf16"), help="default fp32 on CPU, bf16 on GPU")
    attention: str = option("auto", choices=("auto", "xformers", "sdpa"),
                            help="our model's attention kernel (train.py's key); the JSON records what ran")
    zero_stage: int | None = option(None, help="our engine's ZeRO stage (one rank); default 0 in fp32, 1 in "
                                    "bf16 (DeepSpeed keeps fp32 masters only from stage 1)")
    steps: int = option(8, help="timed steps per measurement")
    warmup: int = option(2, help="untimed steps first")
    repeats: int = option(2, help="the paired run times steps x repeats alternating steps per side")
    threads: int | None = option(None, help="torch threads (default: all cores)")
    data_root: str | None = option(None, help="packed dataset for data_wait_fraction (default: pack real emoji "
                                   "images into a temporary directory)")
    loaders: str = option("torch,ffcv,dali", help="loader kinds to try; the fastest one feeds the data-wait "
                          "measurement")
    data_steps: int = option(6, help="steps of the data-wait measurement")
    no_data: bool = option(False, help="skip the data-wait measurement")
    worker: str | None = option(None, choices=("ours", "open_clip", "paired", "data"),
                                help="internal: the measurement a spawned worker process runs")
    loader: str | None = option(None, help="internal: the data worker's loader kind")


def parse_args(argv):
    return parse_config(TrainBenchOptions, "train", argv, __doc__)


# ----------------------------------------------------------------------------- inside a worker

def _fixed_batch(model_config: dict, batch: int, device, dtype):
    import torch
    g = torch.Generator().manual_seed(0)
    size = model_config["vision_cfg"]["image_size"]
    images = torch.randn(batch, 3, size, size, generator=g)
    tokens = torch.zeros(batch, 77, dtype=torch.long)
    ids = torch.randint(1, 49406, (batch, 20), generator=g)
    tokens[:, 0], tokens[:, 1:21], tokens[:, 21] = 49406, ids, 49407
    return images.to(device, dtype), tokens.to(device)


class _Meter:
    """Step times and peak memory of this process."""

    def __init__(self, device):
        import torch
        self.torch, self.cuda = torch, device.type == "cuda"
        self.base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def time(self, step, warmup, steps) -> float:
        for _ in range(warmup):
            step()
        self._sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        self._sync()
        return (time.perf_counter() - start) / steps

    def _sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def peak(self) -> dict:
        out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "peak_rss_delta_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                      - self.base_rss) / 1024}
        if self.cuda:
            out["peak_gpu_mib"] = self.torch.cuda.max_memory_allocated() / 2 ** 20
        return out


def _ours_engine(args, model_name, batch, extra=()):
    import train
    cfg = train.load_config(None, ["data=synthetic", f"model={model_name}", f"micro_batch={batch}",
                                   f"zero_stage={args.zero_stage}", f"precision={args.precision}",
                                   f"attention={args.attention}", "lr=1e-4", "warmup_steps=1",
                                   "total_steps=1000000", *extra])
    rank, world, device = train.init_distributed()
    from model import get_model_config
    model_config = get_model_config(model_name)
    meter = _Meter(device)
    engine = train.build_engine(cfg, model_config)
    return train, cfg, engine, model_config, device, meter


def ours_step(args, batch: int):
    """Our trainer's step (DeepSpeed engine, train.train_step, logit-scale clamp) on a fixed batch."""
    import torch
    train, cfg, engine, model_config, device, meter = _ours_engine(args, args.model, batch)
    from model.losses import ClipLoss, LaClipMTLoss, SimClrLoss
    losses = {"clip": ClipLoss(), "mt": LaClipMTLoss(), "simclr": SimClrLoss()}
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    images, tokens = _fixed_batch(model_config, batch, device, dtype)
    micro = [{"images": images, "tokens": tokens}]

    def step():
        train.train_step(engine, micro, cfg, losses, 0)
        train.clamp_logit_scale(engine)
    return step, meter


def _import_open_clip():
    # torchvision's C++ ops do not load beside torch 2.13.0+cpu; open_clip's models need only its
    # Python side. Benchmark-only, like the tests: never in library code.
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import open_clip
    return open_clip


def open_clip_step(args, batch: int):
    """open_clip's CLIP, its ClipLoss and torch AdamW in a plain loop, on the same fixed batch."""
    import torch
    open_clip = _import_open_clip()
    from model import get_model_config
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meter = _Meter(device)
    cfg = get_model_config(args.model)
    kwargs = {k: v for k, v in cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")}
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**kwargs).to(device).train()
    decay = [p for n, p in model.named_parameters()
             if not (p.ndim < 2 or "embedding" in n or "logit_scale" in n or n.endswith(".bias"))]
    rest = [p for n, p in model.named_parameters() if all(p is not q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.98), eps=1e-8)
    loss_fn = open_clip.loss.ClipLoss()
    images, tokens = _fixed_batch(cfg, batch, device, torch.float32)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            image_features, text_features, scale = model(images, tokens)
            loss = loss_fn(image_features, text_features, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    return step, meter


def worker_side(args, batch: int) -> dict:
    """One side alone in this process: its rate and its peak memory."""
    step, meter = (ours_step if args.worker == "ours" else open_clip_step)(args, batch)
    seconds = meter.time(step, args.warmup, args.steps)
    out = {"samples_per_s": batch / seconds, "step_s": seconds, **meter.peak()}
    if args.worker == "ours":
        from model.attention import kernels_used
        out["attention"] = kernels_used()  # what our model's towers ran, and why
    return out


def worker_paired(args, batch: int) -> dict:
    """Both sides in one process, steps interleaved (ours, open_clip, ours, ...): load on a shared
    machine drifts over seconds, so alternating single steps hits both sides alike."""
    import statistics
    sides = {"ours": ours_step(args, batch), "open_clip": open_clip_step(args, batch)}
    times = {name: [] for name in sides}
    for i in range(args.warmup + args.steps * args.repeats):
        for name, (step, meter) in sides.items():
            seconds = meter.time(step, 0, 1)
            if i >= args.warmup:
                times[name].append(seconds)
    from model.attention import kernels_used
    return {f"{name}_step_s": t for name, t in times.items()} | {
        f"{name}_median_step_s": statistics.median(t) for name, t in times.items()} | {
        "attention": kernels_used()}


def worker_data(args, batch: int) -> dict:
    """Our trainer fed by a real loader: the fraction of step time spent waiting for batches."""
    import torch
    train, cfg, engine, model_config, device, meter = _ours_engine(
        args, args.model, batch, [f"data={args.loader}", f"data_root={args.data_root}",
                                  f"num_workers={max(1, (os.cpu_count() or 2) - 1)}"])
    from model.losses import ClipLoss, LaClipMTLoss, SimClrLoss
    losses = {"clip": ClipLoss(), "mt": LaClipMTLoss(), "simclr": SimClrLoss()}
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    data = train.MicroBatches(cfg, 0, 1, engine.module.image_size)
    waits, totals = [], []
    for i in range(args.warmup + args.data_steps):
        t0 = time.perf_counter()
        micro = [data.next(device, dtype)]
        t_data = time.perf_counter() - t0
        train.train_step(engine, micro, cfg, losses, i + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            waits.append(t_data)
            totals.append(time.perf_counter() - t0)
    return {"data_wait_fraction": sum(waits) / sum(totals), "samples_per_s": batch * len(totals) / sum(totals)}


# ----------------------------------------------------------------------------- the driver

def _spawn(args, worker: str, batch: int, extra=()) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.train", "--worker", worker, "--model", args.model,
           "--micro-batch", str(batch), "--precision", args.precision, "--zero-stage", str(args.zero_stage),
           "--attention", args.attention,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--data-steps", str(args.data_steps),
           *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each worker is its own 1-rank world
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        if "out of memory" in proc.stderr.lower():
            return {"oom": True}
        raise RuntimeError(f"benchmark worker {worker} (batch {batch}) failed, rc {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _auto_batch(args) -> int:
    """Largest power of two at which both sides complete a few steps (GPU)."""
    batch, best = 8, None
    while batch <= 4096:
        if any(_spawn(args, w, batch).get("oom") for w in ("ours", "open_clip")):
            break
        best, batch = batch, batch * 2
    if best is None:
        raise RuntimeError(f"{args.model}: not even a micro batch of 8 fits")
    return best


def _packed_emoji(tmp: str, image_size: int) -> str:
    from packing import builders
    from packing.pack import PackConfig, pack
    folder = builders.build_dataset("emoji", os.path.join(tmp, "emoji"), max_samples=512,
                                    image_size=max(64, image_size + image_size // 8))
    out = os.path.join(tmp, "packed")
    pack(PackConfig(input=folder, out=out, max_side=image_size + image_size // 8, workers=2))
    return out


def _loader_rate(kind: str, root: str, batch: int, image_size: int, batches: int = 8) -> float:
    from loaders import build_loader
    loader = build_loader(kind, root, batch_size=batch, seed=0, epoch=0, image_size=image_size,
                          num_workers=max(1, (os.cpu_count() or 2) - 1))
    it = iter(loader)
    next(it)  # first batch pays worker start / JIT compilation
    start, n = time.perf_counter(), 0
    for _ in range(min(batches, len(loader) - 1)):
        next(it)
        n += 1
    return n * batch / (time.perf_counter() - start) if n else 0.0


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    import torch
    on_gpu = torch.cuda.is_available()
    args.model = args.model or ("ViT-B-16" if on_gpu else "ViT-S-16")
    args.precision = args.precision or ("bf16" if on_gpu else "fp32")
    if args.zero_stage is None:
        args.zero_stage = 1 if args.precision == "bf16" else 0
    args.threads = args.threads or os.cpu_count() or 1
    if args.worker:  # inside a spawned worker process
        batch = int(args.micro_batch)
        result = {"ours": worker_side, "open_clip": worker_side, "paired": worker_paired,
                  "data": worker_data}[args.worker](args, batch)
        print("RESULT " + json.dumps(result), flush=True)
        if args.worker != "open_clip":
            import torch.distributed as dist
            dist.destroy_process_group()
        return result

    micro = args.micro_batch or ("auto" if on_gpu else "8")
    batch = _auto_batch(args) if micro == "auto" else int(micro)
    # rates: both sides in one process, single steps interleaved, medians (robust to machine load)
    paired = _spawn(args, "paired", batch, ["--repeats", str(args.repeats)])
    # peak memory: each side alone in a fresh process
    alone = {side: _spawn(args, side, batch) for side in ("ours", "open_clip")}
    ours_rate = batch / paired["ours_median_step_s"]
    theirs_rate = batch / paired["open_clip_median_step_s"]
    result = {
        "benchmark": "train", "model": args.model, "micro_batch": batch, "precision": args.precision,
        "zero_stage": args.zero_stage, "device": "cuda" if on_gpu else "cpu", "threads": args.threads,
        "ours_samples_per_s": ours_rate, "open_clip_samples_per_s": theirs_rate,
        "ratio": ours_rate / theirs_rate,
        "ours_peak_memory_mib": alone["ours"].get("peak_gpu_mib", alone["ours"]["peak_rss_mib"]),
        "open_clip_peak_memory_mib": alone["open_clip"].get("peak_gpu_mib",
                                                            alone["open_clip"]["peak_rss_mib"]),
        "attention": args.attention, "ours_attention_kernels": paired["attention"],
        "paired_step_s": {k: v for k, v in paired.items() if k.endswith("_step_s") and "median" not in k},
        "alone": alone,
    }
    if not args.no_data:
        with tempfile.TemporaryDirectory() as tmp:
            from model import get_model_config
            image_size = get_model_config(args.model)["vision_cfg"]["image_size"]
            root = args.data_root or _packed_emoji(tmp, image_size)
            rates = {}
            for kind in [k.strip() for k in args.loaders.split(",") if k.strip()]:
                try:
                    rates[kind] = _loader_rate(kind, root, batch, image_size)
                except Exception as err:  # a loader whose package is missing here: recorded, skipped
                    rates[kind] = f"unavailable: {type(err).__name__}: {str(err)[:200]}"
            numeric = {k: v for k, v in rates.items() if isinstance(v, float)}
            fastest = max(numeric, key=numeric.get)
            fed = _spawn(args, "data", batch, ["--loader", fastest, "--data-root", root])
            result.update(loader=fastest, loader_samples_per_s=rates,
                          data_wait_fraction=fed["data_wait_fraction"],
                          ours_fed_samples_per_s=fed["samples_per_s"])
    from benchmarks.common import write_json
    return write_json(result, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
