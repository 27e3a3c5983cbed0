"""loaders/: the read side of packed data: the loader pipelines (FFCV, DALI, plain torch) over what
packing/ wrote, the caption draw and the augmentations.

build_loader() is the one entry point of the training loop; docs/packed-format.md describes the packed
layout. Batches:
  text_mode "rewrite" / "original": (images float32 [B,3,H,W] CLIP-normalised, tokens int32 [B,77])
  text_mode "all":                  (images, tokens int32 [B,max_texts,77], mask bool [B,max_texts])
  slip_views=True (or return_dict=True): a dict {"images", "tokens", ["mask"], "view1", "view2",
  "index"}; view1/view2 are SLIP's SimCLR views (float, normalised), "index" the global sample indices.
Images are contiguous NCHW float32 by default; normalize=False gives uint8 [B,3,H,W] as a channels-last
view (normalise on the accelerator). The GPU packages are imported only when their loader is built, so a
missing FFCV or DALI is never an import error here.
"""
from __future__ import annotations

KINDS = ("ffcv", "dali", "torch")
TEXT_MODES = ("rewrite", "original", "all")


def build_loader(kind: str, root, config=None, **overrides):
    """An iterable of one epoch's batches for this rank, starting at batch `start_batch`.

    The options are loaders.base.LoaderConfig's fields: `config` (a LoaderConfig) with `overrides` replacing
    some of them, or the fields as keywords alone (batch_size is required). len(loader) = batches left.
    draw_text=False skips the captions (benchmarks only). normalize=False hands out uint8 [B,3,H,W] images
    (a channels-last view) for normalising on the accelerator with
    loaders.augment.normalize(images.to(device, non_blocking=True)): the CPU then only decodes and crops.
    With slip_views, normalize=False also leaves SLIP's colour part to the consumer: view1/view2 are the
    uint8 crops [B,H,W,3], made views on the device by loaders.augment.simclr_view_seeded(view.to(device),
    seed, epoch, batch["index"], 1 or 2) (training.data.to_device does both).
    pin_memory=True (where CUDA is available) hands out the CPU tensors page-locked, owned by the batch,
    so that copy is asynchronous; DALI's "mixed" decoding hands out images and crops already on the GPU.
    check_records=True compares every JPEG and caption record with the CRC-32 stored at pack time (a
    corrupted sample raises PackError naming file, index and key; `python -m benchmarks loader` reports
    the cost as record_checksum_overhead).
    p_original / style_weights weight the caption draw (loaders.sampling.caption_weights): the original
    with probability p_original, rewrite styles (by name, in the store's style order, or by position) in
    proportion to their weights, renormalised over the texts each sample has; both None (the default) is
    the uniform draw. Deterministic in (seed, epoch, index) and the same in every loader.
    remaining=((start, stop), ...) narrows the epoch to those ranges of its order, sliced into ranks as the
    whole order is (loaders.sampling; a resume at another world size mid-epoch).
    """
    import dataclasses

    from loaders.base import LoaderConfig

    config = dataclasses.replace(config, **overrides) if config is not None else LoaderConfig(**overrides)
    if config.text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode {config.text_mode!r}, expected one of {TEXT_MODES}")
    if kind == "ffcv":
        from loaders.ffcv_loader import FfcvLoader
        return FfcvLoader(root, config)
    if kind == "dali":
        from loaders.dali_loader import DaliLoader
        return DaliLoader(root, config)
    if kind == "torch":
        from loaders.torch_loader import TorchLoader
        return TorchLoader(root, config)
    raise ValueError(f"loader kind {kind!r}, expected one of {KINDS}")
