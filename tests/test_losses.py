"""Losses against straightforward single-process references (gradients included), and the distributed
versions on 2 real gloo processes against the 1-process reference on the concatenated batch."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model.clip import slip_head
from model.losses import ClipLoss, LaClipMTLoss, SimClrLoss

torch.set_num_threads(1)
N, K, D, WORLD = 8, 3, 16, 2


# ------------------------------------------------------------------ references, written the slow way

def ref_clip(img, txt, scale):
    total = 0.0
    n = img.shape[0]
    for i in range(n):
        row_i = torch.stack([scale * img[i] @ txt[m] for m in range(n)]).reshape(-1)
        row_t = torch.stack([scale * txt[i] @ img[m] for m in range(n)]).reshape(-1)
        total = total + (torch.logsumexp(row_i, 0) - row_i[i]) + (torch.logsumexp(row_t, 0) - row_t[i])
    return total / (2 * n)


def ref_mt(img, txt, mask, scale, text_to_image="all"):
    n, k = mask.shape
    loss_i, loss_t = 0.0, 0.0
    for i in range(n):
        valid = [j for j in range(k) if mask[i, j]]
        for j in valid:
            cands = [m for m in range(n) if mask[m, j]]  # the j-th texts that exist
            logits = torch.stack([scale * img[i] @ txt[m, j] for m in cands]).reshape(-1)
            loss_i = loss_i + (torch.logsumexp(logits, 0) - logits[cands.index(i)]) / len(valid)
            if text_to_image == "all" or j == 0:
                logits = torch.stack([scale * txt[i, j] @ img[m] for m in range(n)]).reshape(-1)
                weight = 1 / len(valid) if text_to_image == "all" else 1.0
                loss_t = loss_t + (torch.logsumexp(logits, 0) - logits[i]) * weight
    return (loss_i + loss_t) / (2 * n)


def ref_simclr(z1, z2, t=0.1):
    # textbook NT-Xent: 2N embeddings, positive = the other view, mean over all 2N anchors
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = z1.shape[0]
    total = 0.0
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        others = [b for b in range(2 * n) if b != a]
        logits = torch.stack([z[a] @ z[b] / t for b in others])
        total = total + torch.logsumexp(logits, 0) - z[a] @ z[pos] / t
    return total / (2 * n)


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    txt = F.normalize(torch.randn(N, K, D, generator=g), dim=-1)
    mask = torch.rand(N, K, generator=g) < 0.6
    mask[:, 0] = True  # the original caption is always there
    mask[1, 1:] = False  # one sample with only its original
    raw = torch.randn(2, N, 32, generator=g)  # SLIP head inputs, two views
    return img, txt, mask, torch.tensor([7.5]), raw


def grads(fn, *tensors):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


# ------------------------------------------------------------------ single process

def test_clip_loss_matches_reference():
    img, txt, _, scale, _ = make_batch()
    ours, g_ours = grads(ClipLoss(), img, txt[:, 0], scale)
    ref, g_ref = grads(ref_clip, img, txt[:, 0], scale)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("text_to_image", ["all", "original"])
def test_mt_loss_matches_reference_and_reduces_to_clip(text_to_image):
    img, txt, mask, scale, _ = make_batch()
    loss = LaClipMTLoss(text_to_image)
    ours, g_ours = grads(lambda i, t, s: loss(i, t, mask, s), img, txt, scale)
    ref, g_ref = grads(lambda i, t, s: ref_mt(i, t, mask, s, text_to_image), img, txt, scale)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    # texts behind the mask get no gradient
    assert g_ours[1][~mask].abs().max() == 0
    # K = 1 with a full mask is plain CLIP
    one = loss(img, txt[:, :1], torch.ones(N, 1, dtype=torch.bool), scale)
    torch.testing.assert_close(one, ClipLoss()(img, txt[:, 0], scale))


def test_mt_text_to_image_conventions_differ_and_bad_value_is_refused():
    img, txt, mask, scale, _ = make_batch()
    every, original = (LaClipMTLoss(c)(img, txt, mask, scale) for c in ("all", "original"))
    assert not torch.isclose(every, original)
    with pytest.raises(ValueError, match="text_to_image"):
        LaClipMTLoss("rewrites")


def test_simclr_loss_matches_reference():
    _, _, _, _, raw = make_batch()
    ours, g_ours = grads(SimClrLoss(0.1), raw[0], raw[1])
    ref, g_ref = grads(ref_simclr, raw[0], raw[1])
    torch.testing.assert_close(ours, ref)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


def test_clip_loss_is_ln_n_for_uninformative_features():
    x = torch.zeros(N, D)
    x[:, 0] = 1
    assert ClipLoss()(x, x, torch.tensor([10.0])).item() == pytest.approx(math.log(N), rel=1e-6)


# ------------------------------------------------------------------ two gloo processes

def all_losses(img, txt, mask, scale, raw, head):
    """Every loss on one batch (the local rows, or the whole batch in the reference)."""
    leaves = [t.clone().requires_grad_(True) for t in (img, txt, scale)]
    i, t, s = leaves
    head.zero_grad()
    losses = {
        "clip": ClipLoss()(i, t[:, 0], s),
        "mt": LaClipMTLoss()(i, t, mask, s),
        "simclr": SimClrLoss()(head(raw[0]), head(raw[1])),
    }
    sum(losses.values()).backward()
    return ({k: v.detach() for k, v in losses.items()}, [x.grad for x in leaves],
            {n: p.grad.clone() for n, p in head.named_parameters()})


def _worker(rank, init_file, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        img, txt, mask, scale, raw = make_batch()
        torch.manual_seed(0)
        head = slip_head(32, 64, 8)
        rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        out = all_losses(img[rows], txt[rows], mask[rows], scale, raw[:, rows], head)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while its peer may still be in a collective
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's exit-time teardown. In 1 of 100 looped runs here, a rank that had saved its
    # results and destroyed the group still died at exit with "terminate called without an active
    # exception" (SIGABRT; faulthandler showed no Python frame: a C++ static destructor meeting a live
    # thread), and mp.spawn failed the test for it. Reached only when everything above succeeded.
    os._exit(0)


def test_two_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    img, txt, mask, scale, raw = make_batch()
    torch.manual_seed(0)
    ref_losses, ref_grads, ref_head = all_losses(img, txt, mask, scale, raw, slip_head(32, 64, 8))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, ref in ref_losses.items():  # mean of the local losses = the global loss
        torch.testing.assert_close(sum(r[0][name] for r in ranks) / WORLD, ref)
    # each rank's feature gradients are WORLD x the reference's rows (DP averaging divides by WORLD)
    for idx in (0, 1):
        got = torch.cat([r[1][idx] for r in ranks]) / WORLD
        torch.testing.assert_close(got, ref_grads[idx])
    # replicated parameters: the averaged gradients equal the 1-process gradients
    torch.testing.assert_close(sum(r[1][2] for r in ranks) / WORLD, ref_grads[2])
    for n, g in ref_head.items():
        torch.testing.assert_close(sum(r[2][n] for r in ranks) / WORLD, g, msg=n)
