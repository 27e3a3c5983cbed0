"""What the FFCV, DALI and torch loaders share: their options, the epoch order and the batch contract.

A loader is built from a pack root and one LoaderConfig (or its fields as keywords). The base reads and
checks meta.json, builds this rank's EpochSampler (the order every loader follows), and shapes the raw
batches of each pipeline into the contract of loaders/__init__.py, so the three differ only in how they
read, decode and crop.
"""
from __future__ import annotations

import dataclasses

import torch

from loaders import augment
from loaders.packed import PackedMeta, read_meta
from loaders.sampling import EpochSampler, caption_weights


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """One epoch's loading options for one rank (build_loader documents them)."""

    batch_size: int
    text_mode: str = "rewrite"
    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1
    image_size: int = 224
    max_texts: int = 5
    slip_views: bool = False
    start_batch: int = 0
    drop_last: bool = True
    augment: bool = True
    draw_text: bool = True
    return_dict: bool = False
    normalize: bool = True
    check_records: bool = False
    pin_memory: bool = False  # page-locked CPU tensors (with CUDA only) for non_blocking copies to a GPU
    p_original: float | None = None  # weighted caption draw (sampling.caption_weights); None and None:
    style_weights: dict | tuple | None = None  # uniform over a sample's texts, today's draw exactly
    remaining: tuple | None = None  # ((start, stop), ...) of the epoch's order left to read (None: all)


class PackedLoader:
    """Iterable of batches for one (rank, epoch) over a packed dataset; len() = batches left.

    Subclasses set `pipeline_normalizes` when their pipeline already hands out normalised float images
    (DALI), and implement __iter__ with finish()."""

    pipeline_normalizes = False

    def __init__(self, root, config: LoaderConfig | None = None, **options):
        self.config = c = dataclasses.replace(config, **options) if config is not None else LoaderConfig(**options)
        self.packed: PackedMeta = read_meta(root)
        self.sampler = EpochSampler(self.packed.shards, seed=c.seed, epoch=c.epoch, batch_size=c.batch_size,
                                    rank=c.rank, world_size=c.world_size, drop_last=c.drop_last,
                                    start_batch=c.start_batch, remaining=c.remaining)
        self.text_mode = c.text_mode
        # float64 [1 + styles] (empty: uniform) that every pipeline's compiled draw reads: by the pack's style
        # ids (its texts carry them, loaders/caption_codec.py), or by position in a pack without styles
        styles = self.packed.meta.get("styles") or None
        if styles and isinstance(c.style_weights, dict):  # a style this pack lacks has no text to weigh
            styles = styles + sorted(set(c.style_weights) - set(styles))
        self.text_weights = caption_weights(c.p_original, c.style_weights, styles)
        self.return_dict = c.return_dict or c.slip_views

    def __len__(self):
        return len(self.sampler)

    def finish(self, raw: dict):
        """Normalise images (unless the pipeline did) and SLIP views in the consumer; shape the batch.

        raw: "images" (uint8 [B,H,W,3], or float [B,3,H,W] from a normalising pipeline), "index" (int64
        [B]), optional "tokens", "mask" and "view1"/"view2" (uint8 crops for SLIP's colour part, which
        normalize=False leaves to the consumer: training.data.to_device runs it on the device)."""
        c, s = self.config, self.sampler
        images = raw["images"]
        if not (self.pipeline_normalizes and c.normalize):
            images = augment.normalize(images) if c.normalize else images.permute(0, 3, 1, 2)
        out = {"images": images, "index": raw["index"]}
        for key in ("tokens", "mask"):
            if key in raw:
                out[key] = raw[key]
        if "view1" in raw and c.normalize:  # colour part per sample from (seed, epoch, index, view)
            index = raw["index"].numpy()
            out["view1"] = augment.simclr_view_seeded(raw["view1"], s.seed, s.epoch, index, 1)
            out["view2"] = augment.simclr_view_seeded(raw["view2"], s.seed, s.epoch, index, 2)
        elif "view1" in raw:  # uint8 crops: the colour part runs where the images are normalised
            out["view1"], out["view2"] = raw["view1"], raw["view2"]
        if c.pin_memory and torch.cuda.is_available():  # what a GPU run copies: uint8 images and crops, texts
            out.update({k: _pinned(out[k]) for k in ("images", "view1", "view2", "tokens", "mask")
                        if k in out and out[k].device.type == "cpu"})
        if self.return_dict:
            return out
        if "tokens" not in out:
            return (out["images"],)
        if self.text_mode == "all":
            return out["images"], out["tokens"], out["mask"]
        return out["images"], out["tokens"]


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """A page-locked copy that the batch owns. Not Tensor.pin_memory(): that returns FFCV's own pinned
    buffers unchanged, which FFCV overwrites a few batches later, possibly under an asynchronous copy.
    torch's pinned allocator keeps this block until the copies that read it have finished."""
    return torch.empty_like(t, pin_memory=True).copy_(t)  # same strides: a channels-last view stays one
