"""GPU acceptance check: the first run on a GPU node, what it ran and its figures, in one JSON.

    python -m benchmarks gpu --prepare .cache/gpu-check            # on a CPU machine, beforehand
    python -m benchmarks gpu --data .cache/gpu-check --out gpu.json  # on one H100/H200: about 5 minutes

--prepare makes what the node needs and cannot make without network (benchmarks/_gpu_prepare.py, with the runs in
benchmarks/gpu_runs.py: a small
real pack, the CPU run's export and results, the wheel list; --wheels downloads the wheels). Steps, each
recorded as ok, skipped (with the reason: a package or the prepared data absent) or failed (with the error,
the other steps still run):
  device        torch, CUDA, the device and its memory, versions of what the steps use
  attention     model.attention.attention with SDPA and with xformers (when it runs): bf16 max error
                against a float64 math reference, microseconds per call (ViT-B/16 image and text shapes)
  train_step    ViT-B/16, bf16, ZeRO 2, one rank (benchmarks/train.py's workers): samples/s, peak memory,
                MFU = samples/s x training FLOPs per sample (counted by torch's FlopCounterMode over a
                forward and backward) / the chip's dense bf16 peak; open_clip's step alternating with ours
                in one process when open_clip is importable
  train_resume  train.py on the prepared pack: N/2 steps with a checkpoint, then --resume latest to N
  eval          eval.py (zero-shot, the prepared held-out emoji) on the CPU run's export and on
                train_resume's export: each within 0.5 points of the CPU result
Without CUDA the command says so in one line, writes {"cuda": false, ...} and exits 0.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import parse_config
from benchmarks.gpu_runs import eval_top1, run_eval, train_resume
from common.config import option

EVAL_TOLERANCE_POINTS = 0.5  # the bar: GPU zero-shot top-1 within 0.5 points of the CPU result
# dense bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets (H200 has H100 SXM's compute)
BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12))


@dataclasses.dataclass
class GpuOptions:
    out: str | None = option(None, help="where to write the JSON result")
    data: str = option(".cache/gpu-check", help="the folder --prepare made")
    prepare: str | None = option(None, help="make the check's data in this folder (on CPU, beforehand) and exit")
    train_steps: int = option(30, help="--prepare: steps of the train.py run (the GPU run repeats the same)")
    samples: int = option(512, help="--prepare: emoji images (30%% held out for eval; the folder must travel)")
    wheels: bool = option(False, help="--prepare: also download the wheel list into <folder>/wheels")
    micro_batch: int = option(128, help="train_step: samples per step")
    train_model: str = option("ViT-B-16", help="train_step: the model/configs model")
    attention_batch: int = option(128, help="attention: batch of the ViT-B/16-shaped inputs")
    steps: int = option(10, help="train_step: timed steps")
    allow_cpu: bool = option(False, help="run every step without CUDA, on the CPU (checks the check itself; "
                             "its figures are not GPU figures)")


# ----------------------------------------------------------------------------- the steps

def step_device(torch) -> dict:
    import importlib.metadata as md
    versions = {}
    for dist in ("deepspeed", "xformers", "numba", "open-clip-torch", "nvidia-dali-cuda120", "ffcv", "vllm"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpus": os.cpu_count(), "packages": versions}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2 ** 30, 1),
                   devices=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported())
    return out


def _us_per_call(torch, fn, device, calls: int = 50) -> float:
    for _ in range(5):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) * 1e6 / calls
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / calls


def step_attention(torch, device, batch: int) -> dict:
    from model.attention import attention, xformers_problem
    g = torch.Generator(device=device).manual_seed(0)
    problem = xformers_problem(device)
    out = {"xformers_runs": problem is None, "batch": batch}
    # ViT-B/16: 197 tokens, 12 heads of 64; its text tower: 77 tokens, 8 heads of 64, causal
    for name, (h, n, d, causal) in {"image": (12, 197, 64, False), "text": (8, 77, 64, True)}.items():
        q, k, v = (torch.randn(batch, h, n, d, device=device, generator=g) for _ in range(3))
        scores = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=device).triu(1), float("-inf"))
        reference = scores.softmax(-1) @ v.double()
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        for kernel in ("sdpa", "xformers"):  # mode=xformers raises rather than fall back: the figure is its own
            if kernel == "xformers" and problem is not None:
                out[f"{name}_{kernel}"] = {"skipped": problem}
                continue
            got = attention(qb, kb, vb, causal=causal, mode=kernel)
            out[f"{name}_{kernel}"] = {
                "max_abs_error_vs_float64": float((got.double() - reference).abs().max()),
                "us_per_call": _us_per_call(torch, lambda: attention(qb, kb, vb, causal=causal, mode=kernel),
                                            device)}
    return out


def training_flops_per_sample(torch, model_name: str, device) -> float:
    """FLOPs of one sample's forward and backward through the CLIP model (both towers), counted."""
    from torch.utils.flop_counter import FlopCounterMode
    from model import build_model, get_model_config
    from benchmarks.train import _fixed_batch
    cfg = get_model_config(model_name)
    model = build_model(cfg).to(device, torch.bfloat16)
    images, tokens = _fixed_batch(cfg, 2, device, torch.bfloat16)
    with FlopCounterMode(display=False) as counter:
        image_features, text_features, scale = model(images, tokens)
        (image_features.float().sum() + text_features.float().sum()).backward()
    return counter.get_total_flops() / 2


def step_train(torch, opts: GpuOptions, device) -> dict:
    import importlib.util
    from benchmarks import train as bench
    model = opts.train_model
    args = bench.parse_args(["--model", model, "--precision", "bf16", "--zero-stage", "2",
                             "--steps", str(opts.steps), "--warmup", "3", "--repeats", "1"])
    args.threads = os.cpu_count() or 1
    ours = bench._spawn(args, "ours", opts.micro_batch)
    if ours.get("oom"):
        return {"failed": f"micro batch {opts.micro_batch} does not fit; try --micro-batch {opts.micro_batch // 2}"}
    flops = training_flops_per_sample(torch, model, device)
    name = torch.cuda.get_device_properties(0).name if device.type == "cuda" else "cpu"
    peak = next((f for key, f in BF16_PEAK if key in name), None)
    out = {"model": model, "precision": "bf16", "zero_stage": 2, "micro_batch": opts.micro_batch,
           "ours_samples_per_s": ours["samples_per_s"],
           "ours_peak_memory_mib": ours.get("peak_gpu_mib", ours["peak_rss_mib"]),
           "training_flops_per_sample": flops, "bf16_peak_flops": peak,
           "mfu": ours["samples_per_s"] * flops / peak if peak else None}
    if peak is None:
        out["mfu_skipped"] = f"no bf16 peak on record for {name!r}"
    if importlib.util.find_spec("open_clip") is None:
        out["open_clip"] = {"skipped": "open_clip is not importable here"}
        return out
    paired = bench._spawn(args, "paired", opts.micro_batch, ["--repeats", "1"])
    ours_rate = opts.micro_batch / paired["ours_median_step_s"]
    theirs_rate = opts.micro_batch / paired["open_clip_median_step_s"]
    out["open_clip"] = {"paired_ours_samples_per_s": ours_rate, "open_clip_samples_per_s": theirs_rate,
                        "ratio": ours_rate / theirs_rate}
    return out


def step_train_resume(data: Path, work: Path, manifest: dict) -> dict:
    got = train_resume(data, work / "run", manifest["train_steps"])
    cpu = manifest["cpu"]["losses"]
    ok = got["resumed"] and got["steps"] == list(range(1, manifest["train_steps"] + 1))
    return {"ok": ok, "steps": len(got["steps"]), "resumed": got["resumed"], "losses": got["losses"],
            "cpu_losses": cpu, "max_loss_diff_vs_cpu": max(abs(a - b) for a, b in zip(got["losses"], cpu)),
            "export": str(got["export"])}


def step_eval(data: Path, work: Path, manifest: dict, trained_export: str | None) -> dict:
    cpu_top1 = manifest["cpu"]["eval_top1"]
    out = {"cpu_top1": cpu_top1, "tolerance_points": EVAL_TOLERANCE_POINTS}
    exports = {"cpu_export": data / "cpu_export"}
    if trained_export:
        exports["train_resume_export"] = Path(trained_export)
    for name, export in exports.items():
        top1 = eval_top1(run_eval(export, data / "emoji", work / f"eval_{name}.json"))
        out[name] = {"top1": top1, "diff_points": top1 - cpu_top1,
                     "ok": abs(top1 - cpu_top1) <= EVAL_TOLERANCE_POINTS}
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def _step(result: dict, name: str, fn):
    start = time.perf_counter()
    try:
        result["steps"][name] = {"status": "ok", **fn()}
    except SkipStep as why:
        result["steps"][name] = {"status": "skipped", "reason": str(why)}
    except Exception:  # recorded: one broken step must not hide the others' figures
        result["steps"][name] = {"status": "failed", "error": traceback.format_exc()[-3000:]}
    result["steps"][name]["seconds"] = round(time.perf_counter() - start, 2)
    print(f"gpu: {name}: {result['steps'][name]['status']} ({result['steps'][name]['seconds']} s)", file=sys.stderr)


class SkipStep(Exception):
    pass


def main(argv: list[str]) -> dict:
    opts = parse_config(GpuOptions, "gpu", argv, __doc__)
    if opts.prepare:
        from benchmarks._gpu_prepare import main as prepare
        return prepare(opts.prepare, opts.train_steps, opts.samples, opts.wheels)
    import torch
    from common.io import write_json_atomic
    cuda = torch.cuda.is_available()
    result = {"benchmark": "gpu", "cuda": cuda, "steps": {}}
    if not cuda:
        result["note"] = "--allow-cpu: every step ran on the CPU; these are not GPU figures"
    if not cuda and not opts.allow_cpu:
        result["reason"] = f"no CUDA device (torch {torch.__version__}): nothing to check"
        if opts.out:
            write_json_atomic(opts.out, result, newline=True)
        print(f"gpu: no CUDA device here (torch {torch.__version__}); nothing run"
              + (f", wrote {opts.out}" if opts.out else ""))
        return result
    start = time.perf_counter()
    data = Path(opts.data)
    manifest = json.loads((data / "manifest.json").read_text()) if (data / "manifest.json").is_file() else None
    work = Path(opts.out or "gpu.json").resolve().with_suffix(".work")
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    device = torch.device("cuda" if cuda else "cpu")

    def needs_data():
        if manifest is None:
            raise SkipStep(f"no prepared data at {data} (run --prepare on a CPU machine and bring the folder)")

    _step(result, "device", lambda: step_device(torch))
    _step(result, "attention", lambda: step_attention(torch, device, opts.attention_batch))
    _step(result, "train_step", lambda: step_train(torch, opts, device))
    _step(result, "train_resume", lambda: needs_data() or step_train_resume(data, work, manifest))
    trained = result["steps"]["train_resume"].get("export")
    _step(result, "eval", lambda: needs_data() or step_eval(data, work, manifest, trained))
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["ok"] = all(s["status"] != "failed" and s.get("ok", True) for s in result["steps"].values())
    if opts.out:
        write_json_atomic(opts.out, result, newline=True)
    print(json.dumps(result, indent=1))
    return result
