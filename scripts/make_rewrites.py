"""Rewrite every training caption of the embedded datasets (`make rewrites`): the shipped store.

Writes the training captions of openclipart and emoji (built into ~/.cache/laclip by packing.builders)
to data/rewrites/embedded/input.jsonl (the demo's fixed sample, data/rewrites/demo/input.jsonl, first, so
that a store still under way already serves the demo; then the others by key) and runs the project's rewrite pipeline on
them with the default
engine and model (configs/rewrite.yaml: vLLM's CPU build serving SmolLM2-135M-Instruct, 4 meta pools,
seed 0) into data/rewrites/embedded/. Re-running resumes: finished shard files are kept, the rest is
redone. `--ranks N` splits the shards over N processes, each with its own engine.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.config import option

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "data", "rewrites", "embedded")
DATASETS = ("openclipart", "emoji")
DEMO_SAMPLE = os.path.join(REPO, "data", "rewrites", "demo", "input.jsonl")


def captions_file() -> str:
    """data/rewrites/embedded/input.jsonl: every training caption, the demo's sample first."""
    from packing.builders import build_dataset, default_cache
    from common.io import read_jsonl
    from rewrite.store import write_atomic

    rows = []
    for name in DATASETS:
        folder = build_dataset(name, os.path.join(default_cache(), name))
        rows += [r for _, r in read_jsonl(os.path.join(folder, "captions.jsonl")) if r["split"] == "train"]
    demo_keys = [r["key"] for _, r in read_jsonl(DEMO_SAMPLE)]
    order = {key: i for i, key in enumerate(demo_keys)}
    rows.sort(key=lambda r: (order.get(r["key"], len(order)), r["key"]))
    path = os.path.join(OUT, "input.jsonl")
    text = "".join(json.dumps({"key": r["key"], "caption": r["caption"]}, ensure_ascii=False) + "\n" for r in rows)
    if not os.path.isfile(path) or open(path, encoding="utf-8").read() != text:
        write_atomic(Path(path), text)
    return path


@dataclasses.dataclass
class MakeRewritesConfig:
    ranks: int = option(1, help="rewrite processes, each with its own engine (1 on 2 cores: the vLLM "
                                "server uses both)")
    rewrite_config: str = option("configs/rewrite.yaml", help="the rewrite run's config (engine, model, pools, "
                                 "seed)", flag="--rewrite-config")


def main(argv=None) -> None:
    from common.config import build_parser, parse
    parser = build_parser(MakeRewritesConfig, "scripts/make_rewrites.py", __doc__, flags="all")
    args, _ = parse(MakeRewritesConfig, parser, argv)  # a bad key or value: one line, exit 2
    inputs = captions_file()
    command = [sys.executable, "-m", "rewrite", "--config", args.rewrite_config,
               "--input", os.path.relpath(inputs, REPO),
               "--out", os.path.relpath(OUT, REPO), "--world-size", str(args.ranks)]
    print("rewrite command:", " ".join(command[1:]), "--rank R", flush=True)
    start = time.time()
    procs = [subprocess.Popen(command + ["--rank", str(r)] + (["--no-progress"] if r else []), cwd=REPO)
             for r in range(args.ranks)]
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"rewrite ranks exited with {codes}; re-run `make rewrites` to resume")
    print(f"make rewrites: {OUT} complete, {time.time() - start:.0f} s this run")


if __name__ == "__main__":
    main()
