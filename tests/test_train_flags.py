"""train.py's open_clip_train alias flags (each onto its config key, --set after them wins, --help says
which key), --epochs' schedule length, and the precision modes: the DeepSpeed config built for a GPU's
fp16 and amp (read back through DeepSpeed's own config parser), bf16 for amp on CPU, and fp16 refused in
one line where DeepSpeed's accelerator has none (this CPU)."""
import math
import subprocess

import pytest
import torch

import train
from common.config import flag_values
from tests.conftest import REPO
from tests.test_train import _command, _env, metrics, run_train
from training.config import TrainConfig, load_config
from training.engine import FP16_LOSS_SCALING, deepspeed_config, run_precision

OPEN_CLIP_FLAGS = {  # flag, value -> (key, the value it reads as)
    ("--batch-size", "32"): ("micro_batch", 32), ("--lr", "1e-3"): ("lr", 1e-3), ("--epochs", "2.5"): ("epochs", 2.5),
    ("--precision", "amp"): ("precision", "amp"), ("--workers", "4"): ("num_workers", 4),
    ("--wd", "0.1"): ("weight_decay", 0.1), ("--warmup", "10"): ("warmup_steps", 10), ("--seed", "7"): ("seed", 7),
    ("--report-to", "wandb,tensorboard"): ("report_to", ["wandb", "tensorboard"]),
}


def config_of(argv: list[str]) -> TrainConfig:
    """The config train.main reads from a command line."""
    args = train.parse_args(argv)
    return load_config(args.config, args.set, flag_values(TrainConfig, args))


def test_alias_flags_set_their_keys_and_set_wins():
    argv = ["--set", "data=synthetic"] + [x for flag_value in OPEN_CLIP_FLAGS for x in flag_value]
    cfg = config_of(argv)
    for (flag, _), (key, want) in OPEN_CLIP_FLAGS.items():
        assert getattr(cfg, key) == want, (flag, key, getattr(cfg, key))
    assert config_of(["--set", "data=synthetic", "--lr", "1e-3", "--set", "lr=2e-3"]).lr == 2e-3
    # open_clip's run folder: <logs>/<name>; an explicit run_dir wins
    assert config_of(["--set", "data=synthetic", "--logs", "/x/logs", "--name", "exp1"]).run_dir == "/x/logs/exp1"
    assert config_of(["--set", "data=synthetic", "--name", "exp1", "--set", "run_dir=/y"]).run_dir == "/y"
    assert config_of(["--set", "data=synthetic"]).run_dir == "runs/default"


def test_help_names_each_flags_key(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag, key in (("--batch-size", "micro_batch"), ("--wd", "weight_decay"), ("--warmup", "warmup_steps"),
                      ("--workers", "num_workers"), ("--precision", "precision")):
        (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(flag + " ")]
        assert f"--set {key}=" in line, line
    assert "micro_batch = 8  (int): samples per rank per forward (--batch-size" in text
    assert "amp (open_clip's mixed precision: fp16 on GPUs, bf16 on CPU" in text


def test_a_bad_flag_value_is_one_line_naming_the_flag(tmp_path):
    proc = subprocess.run(_command(tmp_path / "r", [], 1, None) + ["--precision", "pure_bf16"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert "'precision' from --precision: 'pure_bf16' is not one of fp32, bf16, fp16, amp, amp_bf16" in line


@pytest.mark.parametrize("precision", ["fp16", "amp"])
def test_fp16_deepspeed_section_for_a_gpu(precision):
    """The config a GPU gets, parsed by DeepSpeed's own DeepSpeedConfig: fp16 on, dynamic loss scaling
    from 2^16, bf16 off, fp32 gradient accumulation."""
    from deepspeed.runtime.config import DeepSpeedConfig
    cfg = TrainConfig(data="synthetic", precision=precision, zero_stage=2)
    built = deepspeed_config(cfg, device_type="cuda")
    assert built["fp16"] == FP16_LOSS_SCALING and built["bf16"] == {"enabled": False}
    ds = DeepSpeedConfig(built)
    fp16 = ds.float16_config
    assert fp16.enabled and not ds.bfloat16_config.enabled and fp16.loss_scale == 0  # 0: dynamic
    assert (fp16.initial_scale_power, fp16.loss_scale_window, fp16.hysteresis) == (16, 1000, 2)
    assert ds.grad_accum_dtype == "fp32"


def test_amp_is_bf16_on_cpu_and_mixed_modes_need_zero_1():
    cpu = deepspeed_config(TrainConfig(data="synthetic", precision="amp"), device_type="cpu")
    assert cpu["bf16"] == {"enabled": True} and "fp16" not in cpu
    assert run_precision("amp_bf16", "cuda") == "bf16" and run_precision("fp32", "cuda") == "fp32"
    for precision in ("fp16", "amp", "amp_bf16"):
        with pytest.raises(ValueError, match=f"0 with precision={precision} is refused"):
            load_config(None, ["data=synthetic", "zero_stage=0", f"precision={precision}"])


def test_fp16_on_this_cpu_is_one_line_and_exit_2(tmp_path):
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() != "cpu" or get_accelerator().is_fp16_supported():
        pytest.skip("DeepSpeed's accelerator here runs fp16")
    proc = subprocess.run(_command(tmp_path / "r", ["stop_after=1"], 1, None) + ["--precision", "fp16"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("train: error:")]
    assert "'precision'" in line and "no fp16 on this cpu" in line and "bf16 runs here" in line, line
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_epochs_sets_the_schedule_from_the_data_size(tmp_path):
    """--epochs 1.5 over 256 synthetic samples at global batch 8: ceil(1.5 x 256 / 8) = 48 steps, the
    second epoch reached at step 33."""
    run_dir = tmp_path / "e"
    run_train(run_dir, "synthetic_samples=256", "micro_batch=8", "total_steps=5", "epochs=1.5")
    got = metrics(run_dir)
    assert len(got) == math.ceil(1.5 * 256 / 8)
    assert [r["epoch"] for r in got].index(1) == 256 // 8


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fp16_trains_where_the_accelerator_has_it(tmp_path):
    """fp16 (DeepSpeed's dynamic loss scaling) on an accelerator with fp16, this CPU included when its
    oneDNN has fp16 (AVX512-FP16 / AMX): fp16 weights, fp32 gradient accumulation and exports; the steps
    whose scaled gradients overflow are skipped (their norm is inf) and later steps train."""
    from deepspeed.accelerator import get_accelerator
    from safetensors.torch import load_file
    if not get_accelerator().is_fp16_supported():
        pytest.skip("DeepSpeed's accelerator here has no fp16 (the refusal is tested above)")
    run_dir = tmp_path / "fp16"
    run_train(run_dir, "precision=fp16", "stop_after=8", "warmup_steps=2", "synthetic_samples=256")
    rows = metrics(run_dir)
    assert all(math.isfinite(r["loss"]) for r in rows)
    finite = [r["grad_norm"] for r in rows if math.isfinite(r["grad_norm"])]
    assert finite and rows[-1]["lr"] > rows[0]["lr"], rows  # steps were taken: the warmup advanced
    log = (run_dir / "train.log").read_text()
    assert "precision: parameters float16, gradients accumulate in float32" in log, log
    export = load_file(str(next((run_dir / "checkpoints").glob("step-*/export/open_clip_model.safetensors"))))
    assert {v.dtype for v in export.values()} == {torch.float32}
