"""bf16 at every ZeRO stage DeepSpeed can run it at: the logit-scale clamp acts on the fp32 master weights,
exports are those masters, gradients accumulate in fp32 (with the gradient cache's accumulation); stage 0 +
bf16 (where DeepSpeed 0.19.8 keeps neither) is refused before any rank starts.

One 1-rank launch per stage (the cost: about 10 s each plus DeepSpeed's start-up on a busy machine)."""
import math
import subprocess

import pytest
import torch

from tests.conftest import REPO
from tests.test_train import _command, _env, metrics, run_train

# the initial logit scale above the clamp's ceiling: after one step (lr 1e-3 moves it by about 1e-3) the
# clamp must bring the fp32 master to float32(log 100), which no bf16 value equals (bf16 steps there are
# 1/32: 4.59375 and 4.625)
CLAMPED = torch.tensor([math.log(100)], dtype=torch.float32)
BF16_ARGS = ["precision=bf16", "micro_batch=4", "accumulation=2", "stop_after=1", "warmup_steps=1",
             "model_overrides={init_logit_scale: 5.0}", "synthetic_samples=256"]


def fp32_masters(ckpt, tag: str, stage: int) -> dict:
    """The fp32 master weights in DeepSpeed's checkpoint files, flattened. ZeRO 2/3: its zero_to_fp32;
    ZeRO 1 + bf16 is DeepSpeed's BF16_Optimizer, whose files zero_to_fp32 rejects ("not a zero
    checkpoint"): its one rank's flat fp32 partition, cut by the parameter slice mappings it stores."""
    if stage != 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return {k: v.detach().flatten() for k, v in
                get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag).items()}
    state = torch.load(ckpt / tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=False)["optimizer_state_dict"]
    masters = {}
    for flat, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"]):
        for name, where in mapping.items():
            masters[name] = flat.detach()[where.start:where.start + where.numel]
    return masters


@pytest.mark.timeout(400)
# a train.py launch each (5.1 to 6.0 s on 2 cores): ZeRO 2 stays in the fast subset
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2,
                                   pytest.param(3, marks=pytest.mark.slow)])
def test_bf16_clamp_and_export_act_on_fp32_masters(tmp_path, stage):
    from safetensors.torch import load_file
    run_dir = tmp_path / f"bf16_z{stage}"
    run_train(run_dir, *BF16_ARGS, f"zero_stage={stage}")
    assert math.isfinite(metrics(run_dir)[0]["loss"])
    log = (run_dir / "train.log").read_text()
    assert ("precision: parameters bfloat16, gradients accumulate in float32" in log
            and f"ZeRO {stage}" in log), log
    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    masters = fp32_masters(ckpt, tag, stage)
    export = load_file(str(ckpt / tag / "export" / "open_clip_model.safetensors"))
    assert torch.equal(masters["logit_scale"], CLAMPED), masters["logit_scale"]  # the clamp reached the master
    params = [k for k in export if k in masters]
    assert len(params) == len(masters)
    for name in params:  # every exported weight is its fp32 master, not a bf16-rounded copy
        assert export[name].dtype == torch.float32 and torch.equal(export[name].flatten(), masters[name]), name


def test_bf16_at_stage_0_is_refused_in_one_line(tmp_path):
    cmd = _command(tmp_path / "z0", [*BF16_ARGS, "zero_stage=0"], 1, None)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train: error:")]
    assert len(lines) == 1 and "zero_stage" in lines[0] and "bf16" in lines[0], proc.stderr
    assert not (tmp_path / "z0").exists()  # refused before anything was written
