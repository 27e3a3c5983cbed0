"""The trainer's data: one rank's endless stream of micro batches from loaders.build_loader or the
synthetic dataset, resumable at a (epoch, batch) position.

On a GPU the loaders hand out uint8 images in page-locked memory: the copy to the device moves 4x fewer
bytes than float32, runs asynchronously (non_blocking), and the float conversion and normalisation run on
the GPU. On the CPU the loaders normalise (a compiled kernel, in the loader's workers where it has them).
"""
from __future__ import annotations

import torch

from loaders.synthetic import SyntheticLoader


def as_dict(batch) -> dict:
    """A loader batch (tuple or dict, see loaders.build_loader) -> {"images", "tokens", ["mask", "view1", ...]}."""
    if isinstance(batch, dict):
        return batch
    keys = ("images", "tokens", "mask")[:len(batch)]
    return dict(zip(keys, batch))


def dataset_samples(cfg) -> int:
    """The run's dataset size: the pack's num_samples, or synthetic_samples."""
    if cfg.data == "synthetic":
        return cfg.synthetic_samples
    from loaders.packed import read_meta
    return int(read_meta(cfg.data_root).meta["num_samples"])


class DataError(ValueError):
    """The data cannot feed the run (too few samples for one global batch): one line, exit 2."""


class MicroBatches:
    """This rank's endless stream of micro batches across epochs; (epoch, batch) is the position of
    the next unseen batch, which a checkpoint stores and a resumed run starts from, with `remaining`:
    the ranges of the epoch's order that were sliced into ranks (a resume at another world size
    mid-epoch re-slices what was left; the next epoch slices the whole order again)."""

    def __init__(self, cfg, rank, world, image_size, epoch=0, batch=0, remaining=None):
        self.cfg, self.rank, self.world, self.image_size = cfg, rank, world, image_size
        self.epoch, self.batch = epoch, batch
        # the part of this epoch's order the ranks share out (training/elastic.py; None: all of it)
        self.remaining = None if remaining is None else tuple(map(tuple, remaining))
        self.it = None

    def _open(self, device):
        cfg, on_gpu = self.cfg, torch.device(device).type == "cuda"
        if cfg.data == "synthetic":
            loader = SyntheticLoader(cfg, self.rank, self.world, self.image_size, self.epoch, self.batch)
        else:
            from loaders import build_loader
            loader = build_loader(cfg.data, cfg.data_root, batch_size=cfg.micro_batch,
                                  text_mode=cfg.text_mode, seed=cfg.seed, epoch=self.epoch,
                                  rank=self.rank, world_size=self.world, num_workers=cfg.num_workers,
                                  image_size=self.image_size, max_texts=cfg.max_texts,
                                  slip_views=cfg.image_loss == "slip", start_batch=self.batch,
                                  drop_last=True, augment=cfg.augment, p_original=cfg.caption_p_original,
                                  style_weights=cfg.caption_style_weights or None,
                                  normalize=not on_gpu, pin_memory=on_gpu, remaining=self.remaining)
        if self.batch == 0 and len(loader) == 0:
            raise DataError(f"{cfg.data_root or 'synthetic data'}: fewer samples than one global "
                             f"micro batch ({cfg.micro_batch} x {self.world} ranks)")
        return iter(loader)

    def next(self, device, dtype) -> dict:
        while True:
            if self.it is None:
                self.it = self._open(device)
            try:
                batch = as_dict(next(self.it))
                break
            except StopIteration:
                self.epoch, self.batch, self.it, self.remaining = self.epoch + 1, 0, None, None
        self.batch += 1
        return to_device(batch, device, dtype, seed=self.cfg.seed, epoch=self.epoch)


def to_device(batch: dict, device, dtype, seed: int = 0, epoch: int = 0) -> dict:
    """A loader batch on the device: images and SLIP views in `dtype`, tokens int64, mask bool; every
    copy non_blocking (asynchronous from pinned memory, an ordinary copy otherwise). uint8 images are
    copied as uint8 and normalised there; uint8 SLIP crops get their colour part there, from (seed, epoch,
    the batch's "index", view) as in the loaders. Other keys (the sample indices) stay behind."""
    out = {}
    for key, value in batch.items():
        if key in ("images", "view1", "view2"):
            value = value.to(device, non_blocking=True)
            if value.dtype == torch.uint8:
                from loaders import augment  # cv2, numba: only with a loader
                value = augment.normalize(value) if key == "images" else augment.simclr_view_seeded(
                    value, seed, epoch, batch["index"].numpy(), int(key[-1]))
            out[key] = value.to(dtype)
        elif key in ("tokens", "mask"):
            out[key] = value.to(device, torch.bool if key == "mask" else torch.long, non_blocking=True)
    return out
