"""Fault injection for training and evaluation: kill -9 at a random point of a 2-rank run on a tiny real
pack, then resume, on each loader (torch, FFCV, DALI): the losses and gradient norms equal an
uninterrupted same-seed run bit for bit. Bad inputs (an unwritable run directory, a missing pack, a bad
config, truncated checkpoints in eval.py) end with one line naming the file and a non-zero exit,
before any training step.

The kill point is random: FAULT_SEED=<n> replays one (it is printed with every failure).
"""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from common.processes import is_launcher, launcher_chain
from tests.conftest import REPO
from tests.test_train import _command, _env, grad_norms, losses, metrics, run_train

FAULT_SEED = int(os.environ.get("FAULT_SEED", time.time_ns() % 100000))
STEPS = 10  # about 60 samples / (4 x 2 ranks) = 7 steps per epoch: the runs cross an epoch


def two_rewrites(i: int, row: dict) -> list[str]:
    """0-2 rewrites per caption (row i gets i % 3)."""
    return [f"an emoji of {row['caption'].lower()}", f"{row['caption']} icon"][:i % 3]


@pytest.fixture(scope="session")
def packed(emoji_source, make_pack):
    """About 60 real emoji images (names as captions, 0-2 rewrites each), packed into 2 shards."""
    source = emoji_source(64, two_rewrites, image_size=48)
    return make_pack(input=source["folder"], rewrites=source["rewrites"], max_side=40, samples_per_shard=32,
                     workers=1)["out"]


def _lines(out: str, prefix: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(prefix)]


# ----------------------------------------------------------------------------- kill -9, then resume

@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["torch", "ffcv", "dali"])
@pytest.mark.slow
def test_kill9_then_resume_equals_uninterrupted_run(kind, packed, tmp_path):
    """2 ranks on the real pack through one loader: an uninterrupted run, and a same-seed run killed
    with SIGKILL (runner, launcher, ranks and loader workers at once) after a random step and at a
    random moment within the next one (often inside a checkpoint save), then resumed from `latest`."""
    sets = [f"data={kind}", f"data_root={packed}", "num_workers=1", "micro_batch=4", "lr=2e-3",
            "checkpoint_every=1", f"stop_after={STEPS}"]
    run_train(tmp_path / "whole", *sets, ranks=2, timeout=400)
    rng = random.Random(f"{FAULT_SEED}-{kind}")
    kill_after, delay = rng.randint(2, STEPS - 1), rng.uniform(0, 0.5)
    where = f"{kind}: SIGKILL {delay:.2f} s after step {kill_after} (FAULT_SEED={FAULT_SEED})"

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_command(run_dir, sets, 2, None), cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ((run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= kill_after):
            assert proc.poll() is None and time.time() < deadline, f"{where}\n{proc.stdout.read()[-4000:]}"
            time.sleep(0.02)
        time.sleep(delay)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session: nothing gets to clean up
        proc.communicate()
    run_train(run_dir, *sets, ranks=2, resume="latest", timeout=400)

    whole = losses(tmp_path / "whole")
    assert len(whole) == STEPS and metrics(tmp_path / "whole")[-1]["epoch"] >= 1  # crossed an epoch
    assert losses(run_dir) == whole, where
    assert grad_norms(run_dir) == grad_norms(tmp_path / "whole"), where


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.slow
def test_unwritable_run_dir_and_missing_pack_fail_before_the_first_step(tmp_path):
    """Every rank checks before the engine is built; one line names each problem and the ranks that
    have it, instead of a raw error from every rank at the first save."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    run_dir = blocker / "run"
    out = run_train(run_dir, "data=torch", f"data_root={tmp_path / 'no-pack'}", "stop_after=2", ranks=2,
                    expect_rc=train.EXIT_USAGE)
    (line,) = _lines(out, "train: error:")
    assert f"run_dir {run_dir}: cannot write checkpoints there (Not a directory)" in line
    assert "(ranks 0, 1)" in line
    assert f"data_root {tmp_path / 'no-pack'}: no such directory" in line
    assert "Traceback" not in out


def test_config_mistakes_are_one_line(tmp_path):
    out = run_train(tmp_path / "run", "zero_stage=5", expect_rc=train.EXIT_USAGE)
    (line,) = _lines(out, "train: error:")
    assert "config key 'zero_stage' from --set: 5 is not one of 0, 1, 2, 3" in line and "Traceback" not in out
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def truncated(tmp_path_factory):
    """Checkpoints of every kind eval.py reads, each cut to half its size (a copy interrupted mid-way)."""
    from model.checkpoint import save_export, to_open_clip_state_dict
    from model.clip import build_model
    root = tmp_path_factory.mktemp("truncated")
    model = build_model("tiny")
    weights = save_export(model, None, root / "export")
    (root / "ds" / "step-0000001").mkdir(parents=True)
    states = root / "ds" / "step-0000001" / "mp_rank_00_model_states.pt"
    torch.save({"module": model.state_dict()}, states)
    (root / "ds" / "latest").write_text("step-0000001")
    torch.save(to_open_clip_state_dict(model.state_dict()), root / "open_clip.pt")
    for f in (weights, states, root / "open_clip.pt"):
        data = f.read_bytes()
        f.write_bytes(data[:len(data) // 2])
    return root


@pytest.mark.parametrize("path, model, role", [
    ("export", None, "exported weights (safetensors)"),
    ("ds", "tiny", "DeepSpeed model states (ZeRO 0 weights)"),
    ("open_clip.pt", "tiny", "open_clip state dict (torch.save file)"),
])
def test_truncated_checkpoint_names_the_file_and_its_role(truncated, path, model, role):
    from model.checkpoint import CheckpointReadError, load_checkpoint
    with pytest.raises(CheckpointReadError) as err:
        load_checkpoint(truncated / path, model)
    message = str(err.value)
    assert "\n" not in message and f"cannot read the {role}" in message and "truncated" in message
    named = {"export": "export/open_clip_model.safetensors", "ds": "ds/step-0000001/mp_rank_00_model_states.pt"}
    assert message.startswith(str(truncated / named.get(path, path)))


def test_eval_cli_truncated_checkpoint_is_one_line(truncated, tmp_path):
    proc = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(truncated / "export"),
                           "--datasets", "digits", "--out", str(tmp_path / "x.json")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"eval.py: error: {truncated / 'export' / 'open_clip_model.safetensors'}: cannot read the "
                           "exported weights")
    assert not (tmp_path / "x.json").exists()


def test_launcher_detection():
    """Ranks watch only real launchers above them: a shell script in a folder named deepspeed is not one."""
    assert is_launcher(["/v/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30="])
    assert is_launcher(["/v/bin/python", "/v/bin/deepspeed", "--num_gpus", "2", "train.py"])
    assert is_launcher(["/v/bin/python", "-m", "torch.distributed.run", "train.py"])
    assert not is_launcher(["bash", "/home/me/deepspeed-runs/go.sh"])
    assert not is_launcher(["/v/bin/python", "-m", "pytest", "tests/test_train.py"])
    assert launcher_chain() == []  # pytest is not a launcher
