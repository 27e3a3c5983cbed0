"""The trainer's data: one rank's endless stream of micro batches from loaders.build_loader or the
synthetic dataset, resumable at a (epoch, batch) position."""
from __future__ import annotations

import torch

from loaders.synthetic import SyntheticLoader


def as_dict(batch) -> dict:
    """A loader batch (tuple or dict, see loaders.build_loader) -> {"images", "tokens", ["mask", "view1", ...]}."""
    if isinstance(batch, dict):
        return batch
    keys = ("images", "tokens", "mask")[:len(batch)]
    return dict(zip(keys, batch))


class DataError(ValueError):
    """The data cannot feed the run (too few samples for one global batch): one line, exit 2."""


class MicroBatches:
    """This rank's endless stream of micro batches across epochs; (epoch, batch) is the position of
    the next unseen batch, which a checkpoint stores and a resumed run starts from."""

    def __init__(self, cfg, rank, world, image_size, epoch=0, batch=0):
        self.cfg, self.rank, self.world, self.image_size = cfg, rank, world, image_size
        self.epoch, self.batch = epoch, batch
        self.it = None

    def _open(self):
        cfg = self.cfg
        if cfg.data == "synthetic":
            loader = SyntheticLoader(cfg, self.rank, self.world, self.image_size, self.epoch, self.batch)
        else:
            from loaders import build_loader  # noqa: PLC0415
            loader = build_loader(cfg.data, cfg.data_root, batch_size=cfg.micro_batch,
                                  text_mode=cfg.text_mode, seed=cfg.seed, epoch=self.epoch,
                                  rank=self.rank, world_size=self.world, num_workers=cfg.num_workers,
                                  image_size=self.image_size, max_texts=cfg.max_texts,
                                  slip_views=cfg.image_loss == "slip", start_batch=self.batch,
                                  drop_last=True, augment=cfg.augment, p_original=cfg.caption_p_original,
                                  style_weights=cfg.caption_style_weights or None)
        if self.batch == 0 and len(loader) == 0:
            raise DataError(f"{cfg.data_root or 'synthetic data'}: fewer samples than one global "
                             f"micro batch ({cfg.micro_batch} x {self.world} ranks)")
        return iter(loader)

    def next(self, device, dtype) -> dict:
        while True:
            if self.it is None:
                self.it = self._open()
            try:
                batch = as_dict(next(self.it))
                break
            except StopIteration:
                self.epoch, self.batch, self.it = self.epoch + 1, 0, None
        self.batch += 1
        out = {}
        for key, value in batch.items():
            if key in ("images", "view1", "view2"):
                out[key] = value.to(device, dtype, non_blocking=True)
            elif key in ("tokens", "mask"):
                out[key] = value.to(device, torch.bool if key == "mask" else torch.long)
        return out
