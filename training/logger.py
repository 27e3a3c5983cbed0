"""The trainer's metrics log, on rank 0: metrics.jsonl, train.log, a tqdm bar, the `report_to` loggers
(TensorBoard, W&B) and DeepSpeed's monitors (the `deepspeed:` section's tensorboard / wandb / csv_monitor),
each fed every logged metric: the loss, the learning rate, ..., and the in-training evaluation's numbers."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from common.io import write_atomic

TRAIN_KEYS = ("loss", "lr", "logit_scale", "grad_norm", "samples_per_s", "data_wait", "epoch")
EVAL_PREFIX = "zeroshot/"


def scalars(row: dict) -> dict[str, float]:
    """A metrics.jsonl row's numbers under their logger tags: train/<key>, and zeroshot/<set>/<metric>."""
    out = {f"train/{k}": row[k] for k in TRAIN_KEYS if row.get(k) is not None}
    out.update({k: v for k, v in row.items() if k.startswith(EVAL_PREFIX) and v is not None})
    return out


def monitor_events(row: dict, samples: int) -> list[tuple[str, float, int]]:
    """DeepSpeed monitor events of a row at DeepSpeed's x axis, the samples seen (a DeepSpeed wandb monitor
    has one step axis for its events and ours), named as DeepSpeed names its own: Train/Samples/<key> (the
    loss: Train/Samples/train_loss, as its pipeline engine writes it), Eval/Samples/zeroshot/<set>/<metric>.
    Not the learning rate: DeepSpeed's engine writes it itself, as Train/Samples/lr."""
    events = []
    for tag, value in scalars(row).items():
        if tag == "train/lr":
            continue
        name = ("Train/Samples/train_loss" if tag == "train/loss" else f"Eval/Samples/{tag}"
                if tag.startswith(EVAL_PREFIX) else f"Train/Samples/{tag.removeprefix('train/')}")
        events.append((name, float(value), samples))
    return events


class Logger:
    """metrics.jsonl + train.log + tqdm + report_to + DeepSpeed's monitors, rank 0 only."""

    def __init__(self, cfg, rank: int, start_step: int, monitor=None):
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
        self.monitor = monitor if monitor is not None and monitor.enabled else None
        self.tb = self.wandb = None
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if "wandb" in cfg.report_to:
            self.wandb = start_wandb(cfg, run_dir)
        end = cfg.stop_after or cfg.total_steps
        from tqdm import tqdm
        self.bar = tqdm(total=end, initial=start_step, desc="train", unit="step",
                        disable=not cfg.progress, dynamic_ncols=True)

    def note(self, message: str):
        """A line in <run_dir>/train.log (rank 0)."""
        if self.active:
            self.text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            self.text.flush()

    def log(self, row: dict, samples: int | None = None):
        """One step's row; `samples`: the samples seen so far (the DeepSpeed monitors' x axis)."""
        if not self.active:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.note(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items() if k != "time"))
        tags = scalars(row)
        if self.tb is not None:
            for tag, value in tags.items():
                self.tb.add_scalar(tag, value, row["step"])
        if self.wandb is not None:
            self.wandb.log(tags, step=row["step"])
        if self.monitor is not None:
            self.monitor.write_events(monitor_events(row, row["step"] if samples is None else samples))
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                             sps=f"{row['samples_per_s']:.1f}", wait=f"{row['data_wait']:.2f}")
        self.bar.update(1)

    def close(self, exit_code: int = 0):
        """exit_code: the run's (W&B marks a run that stopped on an error as failed)."""
        if self.active:
            self.bar.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish(exit_code=exit_code)
            self.file.close()
            self.text.close()


def start_wandb(cfg, run_dir: Path):
    """The run's W&B run: a new one, or on a resume the one whose id <run_dir>/wandb_id holds (W&B keeps
    the steps it has; those a resumed run repeats after its checkpoint are ignored by W&B with a warning).
    Its files go under run_dir unless WANDB_DIR says otherwise; WANDB_MODE=offline needs no account."""
    import os
    import secrets

    import wandb

    from common.config import as_dict
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
    write_atomic(id_file, run_id + "\n")
    return wandb.init(project=cfg.wandb_project, name=run_dir.name, id=run_id, resume="allow",
                      config=as_dict(cfg), dir=None if os.environ.get("WANDB_DIR") else str(run_dir))


def _step_of(line: str) -> float:
    """A metrics.jsonl line's step; inf for a torn line (a kill mid-write), which is then dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
