"""Regenerate the shipped LLM rewrite store of the demo (`make rewrites`).

Picks a fixed sample of training captions of the embedded datasets (openclipart, emoji; seeded), writes
them to data/rewrites/demo/input.jsonl, and runs the project's rewrite pipeline on them with the
embedded default model (configs/rewrite.yaml: hf engine, SmolLM2-135M-Instruct, 4 meta pools, seed 0).
Two ranks run side by side (one per core); re-running resumes, finished shards are kept.

The whole dataset would take hours on 2 cores (about 0.35 captions/s for 4 rewrites), so the store
covers a sample; the demo trains on the samples the store covers.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "data", "rewrites", "demo")
SAMPLE = {"openclipart": 700, "emoji": 300}


def captions_file() -> str:
    from loaders.datasets import build_dataset, default_cache

    rows = []
    for name, count in SAMPLE.items():
        folder = build_dataset(name, os.path.join(default_cache(), name))
        with open(os.path.join(folder, "captions.jsonl")) as f:
            train = [json.loads(line) for line in f if '"split": "train"' in line]
        train.sort(key=lambda r: r["key"])
        rows += random.Random(0).sample(train, count)
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "input.jsonl")
    with open(path + ".tmp", "w") as f:
        for r in rows:
            f.write(json.dumps({"key": r["key"], "caption": r["caption"]}) + "\n")
    os.replace(path + ".tmp", path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="parallel rewrite processes (one per core)")
    args = parser.parse_args()
    inputs = captions_file()
    command = [sys.executable, "-m", "rewrite", "--config", "configs/rewrite.yaml", "--input",
               os.path.relpath(inputs, REPO), "--out", os.path.relpath(os.path.join(OUT, "llm"), REPO),
               "--shard-size", "50", "--world-size", str(args.ranks)]
    print("rewrite command:", " ".join(command[1:]), "--rank R", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(command + ["--rank", str(r)] + (["--no-progress"] if r else []), cwd=REPO, env=env)
             for r in range(args.ranks)]
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"rewrite ranks exited with {codes}")


if __name__ == "__main__":
    main()
