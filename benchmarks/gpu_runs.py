"""train.py and eval.py runs of the GPU acceptance check, the same procedure on CPU (--prepare, which
records the reference) and on the GPU node (benchmarks/gpu.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], trace: Path | None = None) -> str:
    """A repository command in a child Python (with -X importtime into `trace` when given)."""
    cmd = [sys.executable, *(["-X", "importtime"] if trace else []), *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if trace:
        with open(trace, "a") as f:
            f.write(proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
        raise RuntimeError(f"{' '.join(args[:1])} failed (rc {proc.returncode}):\n{tail[-3000:]}")
    return proc.stdout


def train_resume(data: Path, run_dir: Path, steps: int, trace: Path | None = None) -> dict:
    """train.py on data/pack: steps/2 with a checkpoint, then --resume latest to `steps` (the same
    procedure on CPU in --prepare and on the GPU). Returns the losses and the final export's path."""
    half = max(1, steps // 2)
    sets = ["data=torch", f"data_root={data / 'pack'}", "num_workers=2", "micro_batch=32", "lr=2e-3",
            "warmup_steps=5", f"total_steps={steps}", f"checkpoint_every={half}", "progress=false",
            "precision=fp32", "zero_stage=1", "seed=0", f"run_dir={run_dir}"]
    base = ["train.py", "--config", "configs/train_tiny.yaml"] + [a for s in sets for a in ("--set", s)]
    _run(base + ["--set", f"stop_after={half}"], trace)
    _run(base + ["--resume", "latest"], trace)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return {"steps": [r["step"] for r in rows], "losses": [r["loss"] for r in rows],
            "resumed": "resumed from" in (run_dir / "train.log").read_text(),
            "export": run_dir / "checkpoints" / latest / "export"}


def run_eval(export: Path, emoji: Path, out: Path, trace: Path | None = None) -> dict:
    _run(["eval.py", "--checkpoint", str(export), "--datasets", f"captions:{emoji}", "--protocols", "zeroshot",
          "--cache-dir", "", "--workers", "0", "--out", str(out)], trace)
    return json.loads(out.read_text())


def eval_top1(result: dict) -> float:
    (entry,) = result["results"].values()
    return entry["zeroshot"]["top1"]
