"""Device-correct by construction: every tensor that meets the images is made on the images' device.

PyTorch's `meta` device has no data but checks devices like CUDA does: an operation mixing a meta tensor
with a CPU tensor of more than one element raises, as a CUDA/CPU mix does on a GPU node. So each function
that would meet GPU images runs here with meta inputs (augment, normalise, SLIP views, the losses, the
trainer's batch-to-device code, the DALI `mixed` branch's post-pipeline code); values are checked on CPU.
"""
import numpy as np
import pytest
import torch

from loaders import augment
from model.losses import ClipLoss, LaClipMTLoss, SimClrLoss

META = torch.device("meta")
B, S = 4, 32


def uint8_images(b=B, size=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g)


def test_normalize_keeps_the_images_device_and_matches_the_cpu_kernel():
    images = uint8_images()
    on_meta = augment.normalize(images.to(META))
    assert on_meta.device == META and on_meta.shape == (B, 3, S, S) and on_meta.dtype == torch.float32
    chw = augment.normalize(images.permute(0, 3, 1, 2).to(META))  # a loader's normalize=False layout
    assert chw.device == META and chw.shape == (B, 3, S, S)
    # the device path (torch ops) against the CPU fast path (numba): one float32 rounding apart
    torch.testing.assert_close(augment.normalize(images.permute(0, 3, 1, 2)), augment.normalize(images),
                               rtol=0, atol=2e-6)


def test_slip_views_on_the_crops_device():
    crops = uint8_images()
    index = np.arange(10, 10 + B)
    for view in (1, 2):
        out = augment.simclr_view_seeded(crops.to(META), seed=3, epoch=1, index=index, view=view)
        assert out.device == META and out.shape == (B, 3, S, S) and out.dtype == torch.float32
    out = augment.simclr_view(crops.to(META), torch.Generator().manual_seed(0))
    assert out.device == META and out.shape == (B, 3, S, S)


def test_slip_view_draws_do_not_depend_on_the_device():
    """The draws are made on the CPU from (seed, epoch, index, view) and moved: drawing on the device
    would give other numbers on a GPU. The CPU result stays the one other tests pin."""
    crops = uint8_images(seed=1)
    from loaders.sampling import SIMCLR_SALT, sample_uniforms
    draws = torch.from_numpy(sample_uniforms(3, 1, np.arange(B, dtype=np.int64), SIMCLR_SALT, 1,
                                             augment.SIMCLR_DRAWS))
    torch.testing.assert_close(augment.simclr_view_seeded(crops, 3, 1, np.arange(B), 1),
                               augment.simclr_colour(crops, draws), rtol=0, atol=0)


def features(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


@pytest.mark.parametrize("mask_device", ["cpu", "meta"])
def test_loss_path_on_meta(mask_device):
    """CLIP, LaCLIP-MT (multi-positive, masks) and SLIP's SimCLR term, forward and backward on meta
    features; LaCLIP-MT's mask may arrive from the loader on the CPU."""
    k, d = 3, 8
    img = features(B, d, seed=0).to(META).requires_grad_()
    txt = features(B, k, d, seed=1).to(META).requires_grad_()
    scale = torch.full((1,), 10.0, device=META)
    mask = (torch.arange(k) < torch.tensor([1, 2, 3, 3]).view(-1, 1)).to(mask_device)
    clip = ClipLoss()(img, txt[:, 0], scale)
    mt = LaClipMTLoss()(img, txt, mask, scale)
    mt_original = LaClipMTLoss("original")(img, txt, mask, scale)
    simclr = SimClrLoss()(features(B, d, seed=2).to(META).requires_grad_(),
                          features(B, d, seed=3).to(META).requires_grad_())
    for loss in (clip, mt, mt_original, simclr):
        assert loss.device == META and loss.shape == ()
    (clip + mt + mt_original + simclr).backward()
    assert img.grad.device == META and txt.grad.device == META


def test_trainer_batch_to_device_normalises_uint8_on_the_device():
    """A GPU run's loaders hand out uint8 images (pinned where possible); the trainer copies them
    (non_blocking) and normalises on the device. Values: the same as the loader's own normalisation."""
    from training.data import to_device
    images = uint8_images().permute(0, 3, 1, 2)  # the loaders' normalize=False layout (channels-last view)
    tokens = torch.randint(0, 49408, (B, 77), dtype=torch.int32)
    mask = torch.ones(B, 2, dtype=torch.bool)
    on_meta = to_device({"images": images, "tokens": tokens, "mask": mask}, META, torch.bfloat16)
    assert on_meta["images"].device == META and on_meta["images"].dtype == torch.bfloat16
    assert on_meta["tokens"].dtype == torch.long and on_meta["mask"].dtype == torch.bool
    on_cpu = to_device({"images": images}, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(on_cpu["images"], augment.normalize(images.permute(0, 2, 3, 1).contiguous()),
                               rtol=0, atol=2e-6)
    already = augment.normalize(images.permute(0, 2, 3, 1).contiguous())  # a normalising loader's float
    assert torch.equal(to_device({"images": already}, torch.device("cpu"), torch.float32)["images"], already)


@pytest.mark.slow  # builds DALI pipelines: 5.6 s on 2 cores
def test_dali_mixed_branch_post_pipeline_code_on_device_images(packed):
    """On a GPU the DALI pipeline decodes with device="mixed": images and SLIP crops come out of
    DALI's iterator on the GPU, tokens and indices on the CPU. The loader's code after the pipeline
    (flags, mask, SLIP's colour views) runs here on such outputs, the image outputs moved to meta."""
    pytest.importorskip("nvidia.dali")
    from loaders import build_loader
    loader = build_loader("dali", packed, batch_size=8, text_mode="all", seed=3, slip_views=True)
    outputs, finish = [], loader._finish
    loader._finish = lambda d: outputs.append({k: v.clone() for k, v in d.items()}) or finish(d)  # DALI's raw outputs
    cpu_batches = [{k: v.clone() for k, v in b.items()} for b in loader]
    for raw, cpu in zip(outputs, cpu_batches):
        as_mixed = {k: (v.to(META) if k in ("images", "v1", "v2") else v) for k, v in raw.items()}
        out = finish(as_mixed)
        for key in ("images", "view1", "view2"):
            assert out[key].device == META and out[key].shape == cpu[key].shape, key
        for key in ("tokens", "mask", "index"):
            assert torch.equal(out[key], cpu[key]), key


# ----------------------------------------------------------------------------- the loaders' GPU paths

# FFCV's case takes about 10 s on 2 cores (two numba pipelines): slow.
@pytest.mark.parametrize("kind", ["torch", pytest.param("ffcv", marks=pytest.mark.slow), "dali"])
def test_gpu_path_uint8_then_normalise_on_the_device_equals_the_cpu_path(kind, packed):
    """What the trainer does on a GPU (loader normalize=False and pin_memory=True, then to_device) gives
    the batches of the CPU path (the loader normalises): same indices, tokens and masks, SLIP views
    bit for bit, images within one float32 rounding (torch ops here, a compiled kernel in the loader)."""
    from tests.test_loaders import run
    from training.data import to_device
    kw = dict(text_mode="all", seed=5, epoch=1, batch_size=8, slip_views=True)
    if kind != "torch":
        pytest.importorskip({"ffcv": "ffcv", "dali": "nvidia.dali"}[kind])
    cpu_path = run(kind, packed, **kw)
    gpu_path = run(kind, packed, normalize=False, pin_memory=True, **kw)
    assert len(cpu_path) == len(gpu_path) > 0
    for a, b in zip(cpu_path, gpu_path):
        assert b["images"].dtype == b["view1"].dtype == torch.uint8
        for key in ("index", "tokens", "mask"):
            assert torch.equal(a[key], b[key]), key
        moved = to_device(b, torch.device("cpu"), torch.float32, seed=5, epoch=1)
        torch.testing.assert_close(moved["images"], a["images"], rtol=0, atol=2e-6)
        for key in ("view1", "view2"):  # SLIP's colour part: the same ops on the same crops
            assert torch.equal(moved[key], a[key]), key
        on_meta = to_device({k: v.to(META) if k in ("images", "view1", "view2") else v for k, v in b.items()},
                            META, torch.bfloat16, seed=5, epoch=1)  # as DALI's mixed branch hands them out
        assert all(on_meta[k].device == META for k in ("images", "view1", "view2", "tokens", "mask"))


def test_dali_mixed_branch_settings_give_the_cpu_indices_and_tokens(packed):
    """The DALI pipeline as a GPU builds it (DALI's resize, which GPU-decoded images need) except that
    the JPEGs are decoded on the CPU: indices, tokens and masks equal the CPU pipeline's, batch by batch;
    only the resize filter (so the pixels) differs."""
    pytest.importorskip("nvidia.dali")
    from loaders import build_loader
    kw = dict(batch_size=8, text_mode="all", seed=7, epoch=2, return_dict=True, slip_views=True)
    cpu = build_loader("dali", packed, **kw)
    mixed = build_loader("dali", packed, **kw)
    assert cpu.cpu_resize and cpu.device_id is None  # no GPU here: the CPU pipeline
    mixed.cpu_resize = False  # what device_id=<a GPU> selects, the decoder device aside
    a = [{k: v.clone() for k, v in b.items()} for b in cpu]
    b = [{k: v.clone() for k, v in b.items()} for b in mixed]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for key in ("index", "tokens", "mask"):
            assert torch.equal(x[key], y[key]), key
        assert x["images"].shape == y["images"].shape and x["view1"].shape == y["view1"].shape
    assert any(not torch.equal(x["images"], y["images"]) for x, y in zip(a, b))  # another resize ran


@pytest.mark.slow  # FFCV numba pipelines over three epochs: 5.9 s on 2 cores
def test_ffcv_allocates_buffers_once_per_shard_not_per_visit(packed, monkeypatch):
    """FFCV's Loader allocates (on a CUDA host: pins) its buffers at every iter(); this loader opens one
    iter() per shard visit, so each shard's buffers are allocated once and reused by every later visit,
    across epochs too. Batches stay those of a fresh process (test_loaders compares them to torch's)."""
    pytest.importorskip("ffcv")
    from ffcv.pipeline.graph import Graph
    from loaders import build_loader
    calls = []
    allocate = Graph.allocate_memory
    monkeypatch.setattr(Graph, "allocate_memory", lambda self, *a: calls.append(a) or allocate(self, *a))
    kw = dict(batch_size=6, text_mode="rewrite", seed=11, num_workers=1, return_dict=True)  # a new config
    visits, first = 0, None
    for epoch in (0, 1):
        loader = build_loader("ffcv", packed, epoch=epoch, **kw)
        visits += len(list(loader._runs()))
        batches = [{k: v.clone() for k, v in b.items()} for b in loader]
        first = first or batches
    shards = len(loader.packed.meta["shards"])
    assert visits > shards and len(calls) == shards, (visits, calls)
    left = iter(build_loader("ffcv", packed, epoch=0, **kw))
    next(left)
    with pytest.raises(RuntimeError, match="two epochs with the same options read this shard at once"):
        next(iter(build_loader("ffcv", packed, epoch=0, **kw)))  # would share the running epoch's buffers
    left.close()  # an epoch left early stops its FFCV threads; the next one may reuse the buffers
    again = [{k: v.clone() for k, v in b.items()} for b in build_loader("ffcv", packed, epoch=0, **kw)]
    assert len(again) == len(first)
    for x, y in zip(first, again):  # epoch 0 again on the reused buffers: the same batches
        for key in ("images", "tokens", "index"):
            assert torch.equal(x[key], y[key]), key
    assert len(calls) == shards
