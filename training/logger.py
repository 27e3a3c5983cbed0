"""The trainer's metrics log: metrics.jsonl, train.log, TensorBoard and a tqdm bar, on rank 0."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from common.io import write_atomic


class Logger:
    """metrics.jsonl + TensorBoard + a tqdm bar, rank 0 only."""

    def __init__(self, cfg, rank: int, start_step: int):
        self.active = rank == 0
        if not self.active:
            return
        run_dir = Path(cfg.run_dir)
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # a resumed run rewrites the steps after its checkpoint
            kept = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) <= start_step]
            write_atomic(self.path, "".join(ln + "\n" for ln in kept))
        self.file = open(self.path, "a")
        self.text = open(run_dir / "train.log", "a")
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        end = cfg.stop_after or cfg.total_steps
        from tqdm import tqdm
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
