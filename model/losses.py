"""Contrastive losses with features gathered across data-parallel ranks *with* gradients.

Every loss here is a "local loss": rank r holds B local rows (global rows r*B .. r*B+B-1 of the
N = B*world global batch), gathers the other ranks' features and computes the loss of its own rows
against the whole global batch. Gradients flow back through the gather (its backward is a
reduce-scatter sum), so rank r's local features receive d(sum_r L_r)/d(features). Data-parallel
gradient averaging (DDP, DeepSpeed) divides by world, which gives exactly the gradient of the
1-process loss on the global batch (= mean_r L_r when every rank has the same B).
All ranks must use the same local batch size B. Single process: no collectives, plain losses.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Far below any real logit (|scale * cos| <= 100), finite so that fully masked rows stay NaN-free.
MASKED = -1e4


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 with gradients (functional collectives: traceable by torch.compile)."""
    if world_size() == 1:
        return x
    from torch.distributed import _functional_collectives as funcol
    out = funcol.all_gather_single(x.contiguous(), 0, dist.group.WORLD)
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks with gradients (backward: sum of the ranks' gradients)."""
    if world_size() == 1:
        return x
    from torch.distributed import _functional_collectives as funcol
    out = funcol.all_reduce(x.contiguous(), "sum", dist.group.WORLD)
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


def _local_labels(local: int, device) -> torch.Tensor:
    return torch.arange(local, device=device) + rank() * local


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP).

    image_features, text_features: [B, D] L2-normalised local rows; logit_scale: the already
    exponentiated and clamped scale (CLIP.forward's third output, shape [1] or []).
    loss = (CE(s * I_local @ T_all^T, labels) + CE(s * T_local @ I_all^T, labels)) / 2,
    labels = arange(B) + rank * B.
    """

    def forward(self, image_features, text_features, logit_scale):
        all_image, all_text = gather_features(image_features), gather_features(text_features)
        labels = _local_labels(image_features.shape[0], image_features.device)
        logits_i2t = logit_scale * image_features @ all_text.T
        logits_t2i = logit_scale * text_features @ all_image.T
        return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


class LaClipMTLoss(nn.Module):
    """LaCLIP-MT: every image with all of its K texts (original + rewrites) in one step.

    Inputs (local rows): image_features [B, D], text_features [B, K, D] (both L2-normalised),
    mask [B, K] bool (text k of sample b exists), logit_scale (exponentiated, clamped).
    With I, T, M the gathered global [N, D], [N, K, D], [N, K] and s the scale:

      image-to-text, per slot j (multi-positive by slots): for a local image i with M[i, j],
          ce_i2t[i, j] = -log softmax_n( s * I_i . T[n, j] )[i]   over the n with M[n, j]
        (a slot's missing texts are not negatives).
      text-to-image, per valid text (i, j):
          ce_t2i[i, j] = -log softmax_n( s * T[i, j] . I_n )[i]   over all N images.
      Each sample averages over its own valid slots, w[i, j] = M[i, j] / sum_j M[i, j], so a sample
      with fewer texts contributes only through its valid slots and still weighs as one sample:
          L_I* = mean_i sum_j w[i, j] ce_i2t[i, j]
      loss = (L_I* + L_T) / 2, the mean over local images i (so mean over ranks = global loss).

    The paper (Fan et al. 2023, eq. 4) defines L_I* over the M+1 texts as above and writes the total as
    L_I* + L_T without saying which texts L_T uses. `text_to_image` makes that choice explicit:
      "all"      (default) every valid text is an anchor: L_T = mean_i sum_j w[i, j] ce_t2i[i, j];
      "original" only the original caption (slot 0, always present): L_T = mean_i ce_t2i[i, 0],
                 i.e. CLIP's text-to-image term on the original captions.
    With K = 1 and a full mask both are exactly ClipLoss. A sample with no valid text contributes 0.
    """

    TEXT_TO_IMAGE = ("all", "original")

    def __init__(self, text_to_image: str = "all"):
        super().__init__()
        if text_to_image not in self.TEXT_TO_IMAGE:
            raise ValueError(f"text_to_image={text_to_image!r}: expected one of {self.TEXT_TO_IMAGE}")
        self.text_to_image = text_to_image

    def forward(self, image_features, text_features, mask, logit_scale):
        b, k, _ = text_features.shape
        mask = mask.to(image_features.device, torch.bool)  # a loader's CPU mask meets GPU features here
        all_image = gather_features(image_features)                     # [N, D]
        all_text = gather_features(text_features)                       # [N, K, D]
        all_mask = gather_features(mask.to(torch.uint8)).to(torch.bool)  # [N, K]
        labels = _local_labels(b, image_features.device).repeat_interleave(k)  # row (i, j) -> i

        logits_i2t = logit_scale * torch.einsum("bd,njd->bjn", image_features, all_text)
        logits_i2t = logits_i2t.masked_fill(~all_mask.T.unsqueeze(0), MASKED)  # [B, K, N]
        logits_t2i = logit_scale * torch.einsum("bjd,nd->bjn", text_features, all_image)
        ce_i2t = F.cross_entropy(logits_i2t.reshape(b * k, -1), labels, reduction="none").view(b, k)
        ce_t2i = F.cross_entropy(logits_t2i.reshape(b * k, -1), labels, reduction="none").view(b, k)

        weights = mask.to(ce_i2t.dtype)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1)
        loss_i = (ce_i2t * weights).sum() / b
        if self.text_to_image == "all":
            loss_t = (ce_t2i * weights).sum() / b
        else:  # slot 0 is the original caption of every sample
            loss_t = ce_t2i[:, 0].sum() / b
        return (loss_i + loss_t) / 2


class SimClrLoss(nn.Module):
    """SLIP's SimCLR term: NT-Xent over two augmented views, temperature 0.1.

    z1, z2: [B, D] local embeddings of view 1 and 2 (the SLIP MLP head outputs; normalised here).
    For anchor z1_i the positive is z2_i; the negatives are every other embedding of both views in the
    global batch (2N - 2 of them; the anchor itself is excluded). Symmetric in the two views, mean
    over the 2B local anchors. SLIP's total loss is ClipLoss + ssl_scale (1.0) * SimClrLoss.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, z1, z2):
        z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
        all1, all2 = gather_features(z1), gather_features(z2)
        labels = _local_labels(z1.shape[0], z1.device)
        self_mask = F.one_hot(labels, all1.shape[0]).to(torch.bool)
        t = self.temperature
        l12, l21 = z1 @ all2.T / t, z2 @ all1.T / t
        l11 = (z1 @ all1.T / t).masked_fill(self_mask, MASKED)
        l22 = (z2 @ all2.T / t).masked_fill(self_mask, MASKED)
        loss1 = F.cross_entropy(torch.cat([l12, l11], dim=1), labels)
        loss2 = F.cross_entropy(torch.cat([l21, l22], dim=1), labels)
        return (loss1 + loss2) / 2
