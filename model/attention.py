"""The one attention function every transformer block in model/ calls, and which kernel it runs.

Kernels: xformers' memory_efficient_attention (CUDA tensors with xformers installed) or torch's
scaled_dot_product_attention (SDPA, which picks flash / memory-efficient / math kernels by itself).
The mode (train.py's `attention` key, CLIP.set_attention):
  auto      xformers where it can run, SDPA elsewhere. If xformers refuses the inputs (its
            NotImplementedError / ValueError: dtype, head size, GPU), that is logged once with the reason
            and SDPA runs;
  xformers  xformers or an error: xformers_problem(device) says why it cannot run before a run starts,
            and a refusal at run time raises;
  sdpa      SDPA always.
Every call notes which kernel ran in its tower and why; kernels_used() / describe() report it (train.py
logs it once per run, the train benchmark records it). xformers is optional: imported lazily, and a
missing or broken install is a reason, never an error, under auto.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

MODES = ("auto", "xformers", "sdpa")
log = logging.getLogger(__name__)

_XFORMERS = None  # None: not tried yet; False: unavailable (_XFORMERS_ERROR says why); else xformers.ops
_XFORMERS_ERROR = ""
_USED: dict[str, tuple[str, str]] = {}  # tower -> (kernel, why) of its latest call
_REFUSALS_LOGGED: set = set()


def _xformers_ops():
    global _XFORMERS, _XFORMERS_ERROR
    if _XFORMERS is None:
        try:
            import xformers.ops as xops  # optional GPU dependency: imported on first use
            _XFORMERS = xops
        except Exception as err:  # ImportError, or a build that does not match this torch
            _XFORMERS, _XFORMERS_ERROR = False, f"{type(err).__name__}: {err}".splitlines()[0]
    return _XFORMERS or None


def xformers_available() -> bool:
    return _xformers_ops() is not None


def xformers_problem(device) -> str | None:
    """Why xformers cannot run on tensors of `device`, or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"no xformers kernel for {device.type} tensors (it runs on CUDA only)"
    if _xformers_ops() is None:
        return f"xformers does not import ({_XFORMERS_ERROR})"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              mode: str = "auto", tower: str = "") -> torch.Tensor:
    """Softmax attention with scale head_dim**-0.5.

    q, k, v: [batch, heads, seq, head_dim] (SDPA's layout). Returns the same layout.
    causal: position i attends to positions <= i (the text tower's mask).
    mode: auto | xformers | sdpa (module docstring); tower: the name kernels_used() reports under.
    """
    if mode == "sdpa":
        return _sdpa(q, k, v, causal, tower, "attention=sdpa")
    if mode not in MODES:
        raise ValueError(f"attention mode {mode!r}, expected one of {MODES}")
    if mode == "auto" and q.is_cuda and torch.compiler.is_compiling():
        problem = "torch.compile traces SDPA"
    else:
        problem = xformers_problem(q.device)
    if problem is not None:
        if mode == "xformers":
            raise RuntimeError(f"attention=xformers: {problem}")
        return _sdpa(q, k, v, causal, tower, problem)
    xops = _xformers_ops()
    return _xformers_or_fallback(xops.memory_efficient_attention, xops.LowerTriangularMask, q, k, v, causal,
                                 mode, tower)


def _xformers_or_fallback(kernel, causal_mask, q, k, v, causal, mode, tower):
    """xformers' kernel; when it refuses the inputs: raise (mode xformers) or log once and run SDPA."""
    try:  # xformers wants [batch, seq, heads, head_dim]
        out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                     attn_bias=causal_mask() if causal else None)
    except (NotImplementedError, ValueError) as err:  # no kernel for this dtype / head size / GPU
        if mode == "xformers":
            raise
        why = (f"xformers refused {str(q.dtype).removeprefix('torch.')} head_dim {q.shape[-1]}: "
               + (str(err).strip().splitlines() or [type(err).__name__])[0])
        if (tower, why) not in _REFUSALS_LOGGED:
            _REFUSALS_LOGGED.add((tower, why))
            log.warning("attention: %s tower falls back to sdpa (%s)", tower or "a", why)
        return _sdpa(q, k, v, causal, tower, why)
    _note(tower, "xformers", "CUDA tensors, xformers installed" if mode == "auto" else "attention=xformers")
    return out.transpose(1, 2)


def _sdpa(q, k, v, causal, tower, why):
    _note(tower, "sdpa", why)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _note(tower: str, kernel: str, why: str):
    # Not inside torch.compile: dynamo cannot replay a store inside activation checkpointing. A compiled
    # model's auto mode is decided above anyway: SDPA, traced into the graph.
    if not torch.compiler.is_compiling():
        _USED[tower] = (kernel, why)


def kernels_used() -> dict[str, dict]:
    """{tower: {"kernel", "why"}} of the latest call in each tower of this process."""
    return {tower: {"kernel": kernel, "why": why} for tower, (kernel, why) in sorted(_USED.items())}


def describe(used: dict | None = None) -> str:
    """One line, e.g. "image tower sdpa (no xformers kernel for cpu tensors ...), text tower sdpa (...)"."""
    used = kernels_used() if used is None else used
    if not used:
        return "no call recorded (compiled models record none: under torch.compile, auto traces SDPA)"
    return ", ".join(f"{tower or 'unnamed'} tower {u['kernel']} ({u['why']})" for tower, u in used.items())
