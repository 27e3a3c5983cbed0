"""Demo stage 2, rewrites: the shipped store made by `make rewrites` (its training captions), a live
sample rewritten with the default engine, the datasets' own alt texts (the oracle) and EDA rewrites of
every training caption, each written as the JSONL a pack stage joins."""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

from scripts.demo_config import DemoConfig
from scripts.demo_data import read_rows, write_rows

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable  # the project's environment


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
    train = read_rows(out / "data" / "train" / "captions.jsonl")
    if cfg.train_require:  # e.g. the caption-rich clip art: title and description
        train = [r for r in train if all(f in (r.get("alt_texts") or {}) for f in cfg.train_require)]
        print(f"  training images with {' + '.join(cfg.train_require)}: {len(train)}")
    train_keys = {r["key"] for r in train}
    result: dict = {"train_captions": len(train)}

    # shipped store(s): the project's own pipeline run over this dataset (make rewrites)
    shipped_root = REPO / cfg.shipped_rewrites
    stores = find_stores(shipped_root)
    llm: dict[str, dict] = {}
    result["shipped"] = []
    wanted = train_keys
    if cfg.shipped_sample:
        wanted = train_keys & {r["key"] for r in read_rows(REPO / cfg.shipped_sample)}
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
        write_rows(live_in, [{"key": r["key"], "caption": r["caption"]} for r in sample])
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
    write_rows(rw / "llm.jsonl", [{"key": k, **v} if None not in v["scores"] else {"key": k, "rewrites": v["rewrites"]}
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
    if cfg.train_min_rewrites:  # every image keeps at least k rewrites after packing drops repeats
        rows = [r for r in rows if len(usable_rewrites(llm.get(r["key"]), r["caption"])) >= cfg.train_min_rewrites]
        print(f"  training images with >= {cfg.train_min_rewrites} LLM rewrites (none repeating its caption): "
              f"{len(rows)}")
    if cfg.train_max_images and len(rows) > cfg.train_max_images:  # a fixed subset: more epochs per hour
        rows = sorted(random.Random(0).sample(rows, cfg.train_max_images), key=lambda r: r["key"])
        print(f"  training set: a fixed random {len(rows)} of them (train_max_images)")
    write_rows(rw / "train" / "captions.jsonl", rows)
    result["train_set"] = {"samples": len(rows), "with_llm_rewrites": sum(r["key"] in llm for r in rows),
                           "train_on": cfg.train_on if rows is not train else "all"}
    # the oracle: the datasets' own other human texts of each image, standing in for the LLM's rewrites
    human = [{"key": r["key"], "rewrites": list(r["alt_texts"].values())} for r in rows if r.get("alt_texts")]
    write_rows(rw / "human.jsonl", human)
    result["human"] = {"captions": len(human), "texts": sum(len(h["rewrites"]) for h in human)}
    print(f"  human alt texts: {result['human']['texts']} texts for {len(human)} of {len(rows)} training images")

    # EDA baseline on every caption of the training set (seconds)
    print(f"  EDA rewrites of {len(rows)} training captions ({cfg.eda_config}):", flush=True)
    summary = run_rewrite(["--config", cfg.eda_config, "--input", str(rw / "train" / "captions.jsonl"),
                           "--out", str(rw / "eda")], rw / "eda.log")
    result["eda"] = {"captions": len(rows), "captions_per_s": summary.get("captions_per_s"),
                     "seconds": summary.get("seconds"), "counts": summary.get("counts")}
    return result


def usable_rewrites(row: dict | None, caption: str) -> list[int]:
    """Positions of the LLM rewrites of `row` that packing keeps (not empty, not the caption again)."""
    from rewrite.quality import same_text
    return [i for i, t in enumerate((row or {}).get("rewrites", [])) if t.strip() and not same_text(t, caption)]


def subsample_rewrites(src: Path, dest: Path, captions: dict[str, str], k: int) -> None:
    """The rows of rewrite JSONL `src` with k of each image's usable rewrites, picked by a hash of the key
    (fixed, independent of the rewrites' fidelity and style), so packs of 1, 2, ... rewrites differ only in
    how many rewrites each image has; styles and scores travel with the texts."""
    rows = []
    for row in read_rows(src):
        keep = usable_rewrites(row, captions.get(row["key"], ""))
        rng = random.Random(hashlib.sha1(row["key"].encode()).hexdigest())
        keep = sorted(rng.sample(keep, min(k, len(keep))))
        rows.append({"key": row["key"], **{f: [row[f][i] for i in keep] for f in ("rewrites", "scores", "styles")
                                          if f in row}})
    write_rows(dest, rows)
