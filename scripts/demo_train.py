"""Demo stages 3-5: pack each method's texts with the same images (packing.pack) and time the loader,
train one tiny CLIP per method and seed with `deepspeed train.py` on CPU, and evaluate every checkpoint
with eval.py's runner."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.ranks import free_port
from scripts.demo_config import METHODS, DemoConfig
from scripts.demo_data import read_rows

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable  # the project's environment


# ----------------------------------------------------------------------------- 3. pack

def pick_loader(kind: str) -> str:
    if kind != "auto":
        return kind
    for name, module in (("ffcv", "ffcv"), ("dali", "nvidia.dali")):
        try:
            importlib.import_module(module)
            return name
        except Exception:  # a broken GPU package counts as missing
            continue
    return "torch"


def measure_loader(kind: str, root: Path, batch_size: int, image_size: int, batches: int) -> dict:
    """samples/s of one rank's loader over `batches` batches (as many epochs as that takes), after a first
    batch that pays start-up (numba compilation for FFCV, worker start for torch)."""
    from loaders import build_loader

    def epoch(e):
        return iter(build_loader(kind, str(root), batch_size=batch_size, text_mode="rewrite", seed=0, epoch=e,
                                 image_size=image_size))

    t0 = time.perf_counter()
    it, e = epoch(0), 0
    next(it)
    first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    while n < batches * batch_size:
        batch = next(it, None)
        if batch is None:  # the epoch is over: the next one (FFCV keeps its compiled Loader)
            e += 1
            it = epoch(e)
            continue
        n += batch_size
    seconds = time.perf_counter() - t1
    return {"kind": kind, "batch_size": batch_size, "image_size": image_size, "samples": n, "epochs": e + 1,
            "samples_per_s": round(n / seconds, 1) if seconds > 0 else None, "first_batch_s": round(first, 1)}


# pack -> (its rewrites, relative to <out>/rewrites; whether it keeps only rewrites scoring >= min_fidelity;
# how many rewrites per image it keeps, None = all)
PACKS = {"llm": ("llm.jsonl", False, None), "llm_1": ("llm.jsonl", False, 1), "llm_2": ("llm.jsonl", False, 2),
         "llm_filtered": ("llm.jsonl", True, None), "human": ("human.jsonl", False, None), "eda": ("eda", False, None)}


def stage_pack(cfg: DemoConfig, out: Path, name: str) -> dict:
    from packing.pack import PackConfig, pack
    from scripts.demo_rewrite import subsample_rewrites

    rewrites, filtered, k = PACKS[name]
    source = out / "rewrites" / rewrites
    if k is not None:
        captions = {r["key"]: r["caption"] for r in read_rows(out / "rewrites" / "train" / "captions.jsonl")}
        source = out / "rewrites" / f"{Path(rewrites).stem}-{k}.jsonl"
        subsample_rewrites(out / "rewrites" / rewrites, source, captions, k)
    summary = pack(PackConfig(input=str(out / "rewrites" / "train"), out=str(out / "packed" / name),
                              rewrites=str(source), max_side=cfg.pack_max_side,
                              min_fidelity=cfg.min_fidelity if filtered else None,
                              quality=cfg.pack_quality, samples_per_shard=cfg.samples_per_shard, workers=2))
    meta = json.loads((out / "packed" / name / "meta.json").read_text())
    return {"samples": meta["num_samples"], "samples_per_s": summary.get("samples_per_s"),
            "seconds": summary.get("seconds"), "text_counts": meta["text_counts"],
            "rewrites_matched": meta["source"].get("rewrites_matched"), "skipped": meta.get("skipped")}


# ----------------------------------------------------------------------------- 4. train

def train_run(cfg: DemoConfig, out: Path, method: str, seed: int, kind: str, max_texts: int) -> dict:
    """One `deepspeed --num_gpus R train.py` run; its log goes to <run>/launcher.log, the bar here follows
    metrics.jsonl. An interrupted run resumes from its last checkpoint."""
    label, pack_name, text_mode = METHODS[method]
    run_dir = out / "runs" / f"{method}-seed{seed}"
    sets = {"data": kind, "data_root": str(out / "packed" / pack_name), "text_mode": text_mode,
            "max_texts": max_texts, "seed": seed, "run_dir": str(run_dir), "total_steps": cfg.steps,
            **({"caption_p_original": cfg.caption_p_original}  # the same for every rewrite arm
               if text_mode == "rewrite" and cfg.caption_p_original is not None else {}),
            "warmup_steps": cfg.warmup_steps, "checkpoint_every": cfg.checkpoint_every, "progress": False,
            **cfg.train_overrides}
    cmd = [str(Path(PY).parent / "deepspeed"), "--num_gpus", str(cfg.ranks), "--master_port", str(free_port()),
           "train.py", "--config", cfg.train_config]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v) if isinstance(v, dict) else v}"]
    cmd += ["--resume", "latest"]  # continues an interrupted run; starts fresh when there is nothing yet
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    metrics = run_dir / "metrics.jsonl"
    t0 = time.time()
    with open(run_dir / "launcher.log", "w") as log, \
            tqdm(total=cfg.steps, desc=f"train {label} seed {seed}", unit="step", dynamic_ncols=True) as bar:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            time.sleep(1.0)
            rows = read_rows(metrics) if metrics.is_file() else []
            if rows and rows[-1]["step"] != bar.n:  # (the run also spends time starting and saving)
                bar.n = rows[-1]["step"]
                bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", sps=f"{rows[-1]['samples_per_s']:.0f}")
                bar.refresh()
    if proc.returncode != 0:
        tail = (run_dir / "launcher.log").read_text().splitlines()[-40:]
        raise RuntimeError(f"training {label} seed {seed} failed (exit {proc.returncode}); last lines of "
                           f"{run_dir / 'launcher.log'}:\n" + "\n".join(tail))
    rows = read_rows(metrics)
    steady = [r["samples_per_s"] for r in rows[min(5, len(rows) - 1):]]
    steady.sort()
    import yaml
    recipe = {**yaml.safe_load((REPO / cfg.train_config).read_text()), **cfg.train_overrides}
    texts = original_share(out / "packed" / pack_name, text_mode, seed, cfg.steps * recipe.get("accumulation", 1),
                           cfg.ranks, recipe.get("micro_batch", 64), sets.get("caption_p_original"))
    return {"run_dir": str(run_dir), "steps": rows[-1]["step"], "final_loss": rows[-1]["loss"], "texts_drawn": texts,
            "samples_per_s_median": steady[len(steady) // 2], "wall_s": round(time.time() - t0, 1),
            "command": " ".join(cmd)}


def original_share(pack: Path, text_mode: str, seed: int, batches: int, ranks: int, micro_batch: int,
                   p_original: float | None) -> dict:
    """Which texts the run's loaders drew, counted: every rank's sample indices of every batch the run read
    (loaders.sampling.EpochSampler, drop_last as training/data.py), each drawn with the loaders' caption
    draw (draw_text_index over the packed texts per sample). {"samples", "original", "original_share"}."""
    from loaders.packed import read_meta
    from loaders.sampling import EpochSampler, caption_weights, draw_text_index
    from loaders.caption_store import CaptionStore

    meta = read_meta(pack)
    store = CaptionStore(str(pack / "captions"))
    n_texts = np.array([len(store.texts(i)) for i in range(len(store))], dtype=np.int64)
    weights = caption_weights(p_original)
    drawn = original = 0
    for rank in range(ranks):
        left, epoch = batches, 0  # micro batches per rank: steps x accumulation
        while left > 0:
            sampler = EpochSampler(meta.shards, seed=seed, epoch=epoch, batch_size=micro_batch,
                                   rank=rank, world_size=ranks, drop_last=True)
            for b in range(min(left, sampler.num_batches)):
                idx = sampler.batch_indices(b)
                k = (np.zeros(len(idx), np.int64) if text_mode == "original" else
                     draw_text_index(seed, epoch, idx, n_texts[idx], weights))
                drawn, original = drawn + len(idx), original + int((k == 0).sum())
            left -= min(left, sampler.num_batches)
            epoch += 1
    return {"samples": drawn, "original": original, "original_share": original / drawn if drawn else None,
            "mean_texts": float(n_texts.mean())}


# ----------------------------------------------------------------------------- 5. eval

def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*")
                  if (p / "export" / "open_clip_model.safetensors").is_file())


def eval_run(cfg: DemoConfig, out: Path, method: str, seed: int) -> dict:
    """eval.py on every checkpoint (zero-shot + retrieval on the held-out split: the curves) and on the
    final one (Fashion-MNIST zero-shot, 5-way 5-shot and linear probe). One JSON per evaluation."""
    from evaluation import runner as ev  # what eval.py runs
    run_dir = out / "runs" / f"{method}-seed{seed}"
    dest = out / "eval" / f"{method}-seed{seed}"
    heldout = [f"captions:{d}" for name in cfg.datasets
               for d in (out / "data" / f"heldout-{name}", out / "data" / f"heldout-{name}-other") if d.is_dir()]
    ckpts = checkpoints(run_dir)
    if not ckpts:
        raise RuntimeError(f"{run_dir}/checkpoints: no exported checkpoint to evaluate")
    common = dict(data_root=str(out / "data"), cache_dir=str(out / "eval" / "cache"), workers=0, seed=0)
    jobs = [(c, dest / f"heldout-{c.name}.json", dict(datasets=heldout, protocols=["zeroshot", "retrieval"]))
            for c in ckpts]
    if cfg.fmnist_max_per_split:
        jobs.append((ckpts[-1], dest / "fashion_mnist.json",
                     dict(datasets=["fashion_mnist"], protocols=["zeroshot", "fewshot", "linear_probe"],
                          max_per_split=cfg.fmnist_max_per_split, fewshot_episodes=cfg.fewshot_episodes)))
    for ckpt, path, kw in tqdm(jobs, desc=f"eval {METHODS[method][0]} seed {seed}", unit="eval", dynamic_ncols=True):
        if not path.is_file():  # eval.py writes its JSON atomically: present = finished
            ev.run(ev.EvalConfig(checkpoint=str(ckpt / "export"), out=str(path), **common, **kw))
    return {"evals": [str(p) for _, p, _ in jobs]}
