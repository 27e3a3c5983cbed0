"""The one attention function every transformer block in model/ calls.

On CUDA tensors with xformers installed it uses xformers' memory-efficient kernel; everywhere else
(CPU, no xformers, or a kernel that refuses the inputs) torch's scaled_dot_product_attention, which
picks flash / memory-efficient / math kernels by itself. xformers is optional: it is imported lazily
and a missing or broken install only means the SDPA path is used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_XFORMERS = None  # None: not tried yet; False: unavailable; else the xformers.ops module


def _xformers_ops():
    global _XFORMERS
    if _XFORMERS is None:
        try:
            import xformers.ops as xops  # noqa: PLC0415 (optional GPU dependency)
            _XFORMERS = xops
        except Exception:  # ImportError, or a build that does not match this torch
            _XFORMERS = False
    return _XFORMERS or None


def xformers_available() -> bool:
    return _xformers_ops() is not None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              use_xformers: bool = True) -> torch.Tensor:
    """Softmax attention with scale head_dim**-0.5.

    q, k, v: [batch, heads, seq, head_dim] (SDPA's layout). Returns the same layout.
    causal: position i attends to positions <= i (the text tower's mask).
    """
    xops = _xformers_ops() if (use_xformers and q.is_cuda) else None
    if xops is not None and not torch.compiler.is_compiling():
        # xformers wants [batch, seq, heads, head_dim]
        bias = xops.LowerTriangularMask() if causal else None
        try:
            out = xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
            return out.transpose(1, 2)
        except (NotImplementedError, ValueError):  # no kernel for this dtype / head size / GPU
            pass
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
