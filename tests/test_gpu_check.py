"""`python -m benchmarks gpu`, the GPU acceptance check, on a CPU machine: --help; without CUDA one line,
exit 0 and {"cuda": false}; --prepare makes the pack, the CPU references and the wheel list; and with
--allow-cpu every step of the check runs (on the CPU, tiny sizes) against what --prepare made, so the
check's own code has run before it meets a GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


def gpu_check(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "benchmarks", "gpu", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_prepare_and_the_steps():
    proc = gpu_check("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--prepare" in proc.stdout and "train_resume" in proc.stdout and "--allow-cpu" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_one_line_exit_0_and_cuda_false(tmp_path):
    out = tmp_path / "gpu.json"
    proc = gpu_check("--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA" in lines[0], proc.stdout
    assert json.loads(out.read_text())["cuda"] is False


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prepare_then_every_step_on_cpu(tmp_path):
    data = tmp_path / "gpu-check"
    prep = gpu_check("--prepare", str(data), "--train-steps", "4", "--samples", "128")
    assert prep.returncode == 0, prep.stderr[-4000:]
    manifest = json.loads((data / "manifest.json").read_text())
    assert len(manifest["cpu"]["losses"]) == 4 and 0 <= manifest["cpu"]["eval_top1"] <= 100
    wheels = (data / "wheels.txt").read_text().split()
    assert "deepspeed==0.19.8" in wheels and not any(w.startswith(("torch==", "numpy==")) for w in wheels)
    assert (data / "pack").is_dir() and (data / "cpu_export" / "open_clip_model.safetensors").is_file()

    out = tmp_path / "gpu.json"
    run = gpu_check("--data", str(data), "--out", str(out), "--allow-cpu", "--train-model", "tiny",
                    "--micro-batch", "4", "--steps", "1", "--attention-batch", "1")
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out.read_text())
    steps = result["steps"]
    assert {name: s["status"] for name, s in steps.items()} == {
        "device": "ok", "attention": "ok", "train_step": "ok", "train_resume": "ok", "eval": "ok"}, steps
    assert steps["attention"]["image_sdpa"]["max_abs_error_vs_float64"] < 0.05  # bf16 inputs: ~5e-3 seen
    assert steps["train_step"]["ours_samples_per_s"] > 0 and steps["train_step"]["training_flops_per_sample"] > 0
    # the same procedure on the same CPU: the resumed run repeats the prepared one exactly
    assert steps["train_resume"]["resumed"] and steps["train_resume"]["max_loss_diff_vs_cpu"] == 0.0
    assert steps["eval"]["cpu_export"]["diff_points"] == 0.0 and steps["eval"]["ok"] and result["ok"]
