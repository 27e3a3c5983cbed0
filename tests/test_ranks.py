"""common/ranks.py: rank and world size from the deepspeed launcher / torchrun, SLURM and flags; refusals;
and real two-process launches with only SLURM's variables (as srun sets them) for pack and eval."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from common.ranks import RankError, Ranks, export_torch_env, free_port, resolve_ranks

from tests.conftest import REPO

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")


def slurm_env(procid: int, ntasks: int) -> dict:
    """What srun gives each task (the subset we read), on one node."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid),
            "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(procid), "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1"}


def test_launchers_map_to_the_same_ranks():
    assert resolve_ranks(env={}) == Ranks(0, 1, 0, "single")
    assert resolve_ranks(env={"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == Ranks(3, 8, 1, "torch")
    assert resolve_ranks(env=slurm_env(5, 6)) == Ranks(5, 6, 5, "slurm")
    # torchrun / deepspeed started by srun (one launcher per node): their RANK wins over SLURM_PROCID
    assert resolve_ranks(env={**slurm_env(1, 2), "RANK": "9", "WORLD_SIZE": "16"}).rank == 9
    assert resolve_ranks(2, 4, env=slurm_env(0, 2)) == Ranks(2, 4, 0, "flags")
    assert resolve_ranks(1, env={"RANK": "0", "WORLD_SIZE": "2"}) == Ranks(1, 2, 0, "flags")


@pytest.mark.parametrize("env,match", [
    ({"WORLD_SIZE": "4"}, "no \\$RANK"),
    ({"RANK": "1"}, "WORLD_SIZE"),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, "not started by srun"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, "outside world size 4"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "not an integer"),
])
def test_a_launch_without_a_rank_is_refused(env, match):
    with pytest.raises(RankError, match=match):
        resolve_ranks(env=env)


def test_export_torch_env_for_slurm():
    env = dict(slurm_env(1, 2))
    export_torch_env(resolve_ranks(env=env), env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("1", "2", "1", "127.0.0.1")
    assert env["MASTER_PORT"] == str(20000 + 4242)
    with pytest.raises(RankError, match="MASTER_ADDR"):
        export_torch_env(Ranks(1, 2, 1, "slurm"), {})


def _run_tasks(args: list[str], ntasks: int = 2, timeout: int = 240, **extra_env) -> list[subprocess.CompletedProcess]:
    """Start `ntasks` processes at once, each with only SLURM's variables, as srun would."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    base.update(extra_env)
    procs = [subprocess.Popen([sys.executable] + args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**base, **slurm_env(i, ntasks), "OMP_NUM_THREADS": "1"})
             for i in range(ntasks)]
    done = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    return done


@pytest.mark.timeout(400)
@pytest.mark.slow
def test_pack_under_two_slurm_tasks_equals_one_process(tmp_path):
    from packing import builders
    from packing.pack import PackConfig, pack
    folder = builders.build_dataset("openclipart", str(tmp_path / "oc"), max_samples=20, image_size=96, seed=1)
    rows = [json.loads(line) for line in open(os.path.join(folder, "captions.jsonl"))]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["relative_image_path", "caption"])
        w.writerows([r["file"], r["caption"]] for r in rows)
    common = ["--input", str(tmp_path / "train.csv"), "--image-root", folder, "--samples-per-shard", "7",
              "--max-side", "64", "--workers", "1"]
    single = pack(PackConfig(input=common[1], image_root=folder, samples_per_shard=7, max_side=64, workers=1,
                             out=str(tmp_path / "one")))
    tasks = _run_tasks(["-m", "packing", *common, "--out", str(tmp_path / "two"), "--wait-s", "200"])
    for t in tasks:
        assert t.returncode == 0, t.stdout[-3000:]
    staged = [max(int(n) for n in re.findall(r"stage images: (\d+)img", t.stdout)) for t in tasks]
    assert staged == [13, 7]                       # shards 0, 2 (7 + 6 samples) on task 0, shard 1 on task 1
    assert single["num_samples"] == 20
    for rel in ("keys.txt", "dali/part-00000.tar", "dali/part-00001.tar", "dali/part-00002.tar"):
        digests = {hashlib.sha256((tmp_path / d / rel).read_bytes()).hexdigest() for d in ("one", "two")}
        assert len(digests) == 1, rel


@pytest.mark.timeout(300)
def test_eval_under_two_slurm_tasks_splits_the_sets(tmp_path):
    from model.checkpoint import save_export
    from model.clip import build_model
    save_export(build_model("tiny"), None, tmp_path / "export")
    colours = tmp_path / "colours"
    from PIL import Image
    for split in ("train", "test"):
        for name, rgb in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
            (colours / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20 + i, 16), rgb).save(colours / split / name / f"{i}.png")
    tasks = _run_tasks(["eval.py", "--checkpoint", str(tmp_path / "export"), "--datasets", f"digits,folder:{colours}",
                        "--protocols", "zeroshot", "--max-per-split", "50", "--workers", "0",
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r.json")])
    for t in tasks:
        assert t.returncode == 0, t.stdout[-3000:]
    results = [json.loads((tmp_path / f"r.rank{i}-of-2.json").read_text())["results"] for i in range(2)]
    assert list(results[0]) == ["digits"] and list(results[1]) == ["folder:colours"]


def test_train_refuses_a_multi_task_launch_without_a_rank(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_PROCID="0")       # an sbatch script, no srun
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/train_tiny.yaml",
                           "--set", f"run_dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "not started by srun" in proc.stderr


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_train_under_two_slurm_tasks_is_one_world_of_two(tmp_path):
    """Two tasks with srun's variables only: one DeepSpeed world of 2 (the rendezvous address from
    SLURM_LAUNCH_NODE_IPADDR), one run directory, the same loss logged once."""
    port = str(free_port())
    run_dir = tmp_path / "run"
    tasks = _run_tasks(["train.py", "--config", "configs/train_tiny.yaml", "--set", f"run_dir={run_dir}",
                        "--set", "stop_after=2", "--set", "checkpoint_every=0", "--set", "progress=false"],
                       MASTER_PORT=port)
    for t in tasks:
        assert t.returncode == 0, t.stdout[-3000:]
    assert "start: 2 rank(s), global batch 32" in (run_dir / "train.log").read_text()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
