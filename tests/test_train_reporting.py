"""Where train.py's metrics go besides metrics.jsonl: report_to tensorboard and wandb (W&B in offline mode,
its run's own files read back), DeepSpeed's monitors (its CSV monitor's files), rank 0 alone, the same W&B
run continued on resume; and no progress bar, the in-training evaluation's included, with progress=false."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.test_train import _command, _env, metrics

SETS = ["stop_after=3", "checkpoint_every=0", "eval_every=2", "eval_datasets=digits", "eval_max_per_split=60",
        "report_to=[tensorboard, wandb]"]


def wandb_runs(wandb_dir: Path) -> list[tuple[str, dict[int, dict]]]:
    """Each offline W&B run under wandb_dir, oldest first: (run id, {step: logged values}), read in a fresh
    interpreter (tests/wandb_offline_log.py says why)."""
    proc = subprocess.run([sys.executable, "-m", "tests.wandb_offline_log", str(wandb_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [(run_id, {int(step): row for step, row in history.items()})
            for run_id, history in json.loads(proc.stdout)]


def csv_column(path: Path) -> dict[int, float]:
    with open(path) as f:
        return {int(r["step"]): float(r[next(k for k in r if k != "step")]) for r in csv.DictReader(f)}


def launch(run_dir: Path, tmp_path: Path, *sets: str, resume: str | None = None) -> str:
    monitor = {"csv_monitor": {"enabled": True, "output_path": str(tmp_path / "ds_csv"), "job_name": "tiny"}}
    cmd = _command(run_dir, [*SETS, f"deepspeed={json.dumps(monitor)}", "progress=false", *sets], 2, resume)
    env = dict(_env(), WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb_dir"), WANDB_SILENT="true")
    (tmp_path / "wandb_dir").mkdir(exist_ok=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wandb_tensorboard_and_deepspeed_monitors_get_every_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = tmp_path / "run"
    out = launch(run_dir, tmp_path)
    # progress=false: no bar at all, the evaluation's ("digits/test: 40%|...") included
    assert "digits/test" not in out and "%|" not in out, out[-4000:]
    rows = metrics(run_dir)
    evaluated = [r for r in rows if "zeroshot/digits/top1" in r]
    assert [r["step"] for r in evaluated] == [2, 3]

    (run_id, history), = wandb_runs(tmp_path / "wandb_dir")  # one run: rank 1 logged nothing
    assert run_id == (run_dir / "wandb_id").read_text().strip()
    assert [history[r["step"]]["train/loss"] for r in rows] == [r["loss"] for r in rows]
    for r in evaluated:
        for key in ("zeroshot/digits/top1", "zeroshot/digits/top5", "zeroshot/digits/mean_per_class"):
            assert history[r["step"]][key] == r[key], key

    tb = EventAccumulator(str(run_dir / "tensorboard"))
    tb.Reload()
    assert [e.value for e in tb.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows], rel=1e-6)  # float32
    assert [e.step for e in tb.Scalars("zeroshot/digits/top1")] == [2, 3]

    # DeepSpeed's CSV monitor: the loss and the evaluation beside its own learning rate, at samples seen
    csv_dir = tmp_path / "ds_csv" / "tiny"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    samples = cfg["micro_batch"] * cfg["accumulation"] * 2
    assert csv_column(csv_dir / "Train_Samples_train_loss.csv") == {r["step"] * samples: r["loss"] for r in rows}
    assert csv_column(csv_dir / "Eval_Samples_zeroshot_digits_top1.csv") == {
        r["step"] * samples: r["zeroshot/digits/top1"] for r in evaluated}
    assert set(csv_column(csv_dir / "Train_Samples_lr.csv")) == {r["step"] * samples for r in rows}

    # a resume continues the same W&B run
    launch(run_dir, tmp_path, "stop_after=4", resume="latest")
    runs = wandb_runs(tmp_path / "wandb_dir")
    assert [run for run, _ in runs] == [run_id, run_id]
    assert runs[1][1][4]["train/loss"] == metrics(run_dir)[-1]["loss"]
