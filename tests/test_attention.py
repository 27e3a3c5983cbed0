"""Attention that says what ran: the `attention` key (auto | xformers | sdpa), the kernel each tower ran
and why, a refusal under auto logged once, and `attention=xformers` refused where xformers cannot run
(here: no CUDA, and xformers is not installed) with one line and exit 2 from a real train.py launch."""
import logging
import math
import subprocess

import pytest
import torch

from model import attention as A
from model import build_model
from tests.conftest import REPO
from tests.test_train import _command, _env, metrics


def qkv(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 5, 8, generator=g, dtype=dtype) for _ in range(3)]


def reference(q, k, v, causal):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    return scores.softmax(-1) @ v


def test_auto_on_cpu_runs_sdpa_and_says_why():
    q, k, v = qkv()
    for mode in ("auto", "sdpa"):
        torch.testing.assert_close(A.attention(q, k, v, causal=True, mode=mode, tower="t"),
                                   reference(q, k, v, True))
    assert A.kernels_used()["t"] == {"kernel": "sdpa", "why": "attention=sdpa"}
    A.attention(q, k, v, mode="auto", tower="t")
    assert A.kernels_used()["t"] == {"kernel": "sdpa",
                                     "why": "no xformers kernel for cpu tensors (it runs on CUDA only)"}


def test_xformers_mode_raises_where_xformers_cannot_run():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="attention=xformers: no xformers kernel for cpu tensors"):
        A.attention(q, k, v, mode="xformers")
    assert A.xformers_problem("cpu") == "no xformers kernel for cpu tensors (it runs on CUDA only)"
    with pytest.raises(ValueError, match="attention mode 'flash'"):
        A.attention(q, k, v, mode="flash")


def test_the_model_reports_each_tower():
    m = build_model("tiny")
    m.set_attention("sdpa")
    images = torch.randn(2, 3, m.image_size, m.image_size)
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 49406, 320, 49407
    A._USED.clear()
    m(images, tokens)
    assert A.describe() == "image tower sdpa (attention=sdpa), text tower sdpa (attention=sdpa)"
    m.set_attention("auto")
    m(images, tokens)
    assert set(A.kernels_used()) == {"image", "text"}
    with pytest.raises(ValueError):
        m.set_attention("flash")


def refusing_kernel(q, k, v, attn_bias=None):
    """What xformers' memory_efficient_attention does with inputs no kernel of it supports (its
    dispatcher's NotImplementedError). xformers cannot run on this machine, so the fallback policy is
    exercised through the function it wraps the kernel in."""
    raise NotImplementedError(f"No operator found for `memory_efficient_attention_forward` with inputs:\n"
                              f"     query : shape={tuple(q.shape)} ({q.dtype})")


def test_a_refusal_under_auto_is_logged_once_and_falls_back_to_sdpa(caplog):
    q, k, v = qkv(seed=1)
    with caplog.at_level(logging.WARNING, logger="model.attention"):
        for _ in range(3):
            out = A._xformers_or_fallback(refusing_kernel, object, q, k, v, True, "auto", "refusal-test")
            torch.testing.assert_close(out, reference(q, k, v, True))
    lines = [r.getMessage() for r in caplog.records if "refusal-test" in r.getMessage()]
    assert lines == ["attention: refusal-test tower falls back to sdpa (xformers refused float32 head_dim 8: "
                     "No operator found for `memory_efficient_attention_forward` with inputs:)"]
    assert A.kernels_used()["refusal-test"]["kernel"] == "sdpa"
    assert "xformers refused float32 head_dim 8" in A.kernels_used()["refusal-test"]["why"]


def test_a_refusal_under_xformers_raises():
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="No operator found"):
        A._xformers_or_fallback(refusing_kernel, object, q, k, v, False, "xformers", "t")


def test_train_with_attention_xformers_and_no_xformers_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(_command(tmp_path / "run", ["attention=xformers"], 1, None), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["train: error: attention=xformers: no xformers kernel for cpu tensors (it runs on CUDA "
                     "only); attention=auto or sdpa runs SDPA (rank 0)"], proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # a train.py launch: 5.4 s on 2 cores
def test_train_log_says_which_kernel_each_tower_ran(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(_command(run_dir, ["total_steps=2", "attention=auto"], 1, None), cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    notes = [ln.split(" ", 2)[2] for ln in (run_dir / "train.log").read_text().splitlines()
             if " attention: " in ln]
    why = "no xformers kernel for cpu tensors (it runs on CUDA only)"
    assert notes == [f"attention: image tower sdpa ({why}), text tower sdpa ({why})"]
    assert len(metrics(run_dir)) == 2
