"""train.py where users expect open_clip's behaviour: --resume latest on an empty run directory starts
fresh, a run directory holding a run is refused unless resuming, keep-last-N checkpoints, zero-shot
evaluation every N steps logged beside the loss, the config's `deepspeed:` section reaching DeepSpeed
(its CSV monitor writes), and a text log."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

COMMON = ["model=tiny", "data=synthetic", "synthetic_samples=256", "micro_batch=8", "lr=1e-3", "warmup_steps=1",
          "total_steps=100", "progress=false", "precision=fp32", "seed=0", "zero_stage=1"]


def train(run_dir: Path, *sets: str, resume: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", "--config", "configs/train_tiny.yaml"]
    for item in COMMON + [f"run_dir={run_dir}"] + list(sets):
        cmd += ["--set", item]
    if resume:
        cmd += ["--resume", resume]
    return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=240)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(500)
@pytest.mark.slow
def test_resume_latest_fresh_refusal_keep_last_eval_and_deepspeed_section(tmp_path):
    run_dir = tmp_path / "run"
    monitor = {"csv_monitor": {"enabled": True, "output_path": str(tmp_path / "ds_csv"), "job_name": "tiny"}}
    extra = ["checkpoint_every=1", "keep_checkpoints=2", "eval_every=2", "eval_datasets=digits",
             "eval_max_per_split=60", f"deepspeed={json.dumps(monitor)}"]
    first = train(run_dir, "stop_after=3", *extra, resume="latest")        # nothing to resume yet
    assert first.returncode == 0, first.stderr[-4000:]
    got = rows(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-0000002", "step-0000003"]
    for r in got:   # evaluated at step 2 (every 2) and at the last step, beside the loss
        assert ("zeroshot/digits/top1" in r) == (r["step"] in (2, 3)), r
    assert 0 <= got[1]["zeroshot/digits/top1"] <= 100 and "zeroshot/digits/top5" in got[1]
    csv_files = list((tmp_path / "ds_csv").rglob("*.csv"))
    assert csv_files, "DeepSpeed's csv_monitor wrote nothing: the deepspeed: section did not reach it"
    log = (run_dir / "train.log").read_text()
    assert "nothing to resume, starting fresh" in log and "step=3 loss=" in log and "end: finished" in log

    again = train(run_dir, "stop_after=4", *extra)                         # a new run into the same place
    assert again.returncode != 0
    assert f"{run_dir} already holds a run" in again.stderr and "--resume latest" in again.stderr
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3]                 # nothing truncated

    resumed = train(run_dir, "stop_after=4", *extra, resume="latest")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-0000003", "step-0000004"]
    assert "resumed from" in (run_dir / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_in_training_eval_longer_than_the_collective_timeout(tmp_path):
    """2 CPU ranks: rank 0 evaluates the full Fashion-MNIST test set (10,000 images) for longer than the
    collective timeout while rank 1 waits outside it (eval_timeout_s); the run finishes. The same wait
    with eval_timeout_s below the evaluation's length fails: the wait honours its own timeout."""
    from tests.test_train import _command, _env
    sets = ["eval_every=1", "eval_datasets=fashion_mnist", "eval_max_per_split=0", "stop_after=1",
            "collective_timeout_s=5", "checkpoint_every=0"]

    def launch(run_dir, *extra):
        cmd = _command(run_dir, [*sets, *extra], 2, None)
        return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)

    ok = launch(tmp_path / "ok")
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-4000:]
    row = rows(tmp_path / "ok")[0]
    # the evaluation outlasted the collective timeout: a barrier of the main group would have failed
    assert row["zeroshot/seconds"] > 5 and 0 <= row["zeroshot/fashion_mnist/top1"] <= 100, row
    short = launch(tmp_path / "short", "eval_timeout_s=1")
    out = short.stdout + short.stderr
    assert short.returncode != 0 and "Timed out waiting 1000ms" in out, out[-4000:]  # gloo's words
