"""data=synthetic: a seeded random dataset with the loaders' interface (train.py's step-equality tests use it)."""
from __future__ import annotations

import numpy as np
import torch

SOT, EOT, CONTEXT = 49406, 49407, 77


class SyntheticLoader:
    """Seeded random images and token sequences, a pure function of (seed, epoch, sample index).

    The loaders' interface, but not their sharding: build_loader gives each rank a contiguous slice of
    the epoch's order, while here ranks interleave (micro batch k of rank r holds positions
    k*world*B + r*B .. +B of the epoch's permutation), so one optimizer step covers the same global
    batch for every split into ranks x accumulation x micro batch (the step-equality tests use it).
    Sample i has 1 + i % max_texts texts; their content is random ids.
    """

    def __init__(self, cfg, rank, world, image_size, epoch, start_batch):
        self.cfg, self.rank, self.world, self.size = cfg, rank, world, image_size
        self.epoch, self.start = epoch, start_batch
        self.perm = np.random.default_rng([cfg.seed, epoch, 7]).permutation(cfg.synthetic_samples)

    def batches_per_epoch(self) -> int:
        return self.cfg.synthetic_samples // (self.cfg.micro_batch * self.world)

    def __len__(self):  # batches left, like the loaders
        return max(0, self.batches_per_epoch() - self.start)

    def texts(self, i: int) -> np.ndarray:
        k = self.cfg.max_texts
        rng = np.random.default_rng([self.cfg.seed, int(i), 1])
        out = np.zeros((k, CONTEXT), dtype=np.int64)
        for j in range(1 + i % k):
            ids = rng.integers(1, SOT, size=rng.integers(3, 12))
            out[j, :len(ids) + 2] = [SOT, *ids, EOT]
        return out

    def sample(self, i: int) -> dict:
        cfg, s = self.cfg, self.size
        image = np.random.default_rng([cfg.seed, int(i), 0]).standard_normal((3, s, s), np.float32)
        texts = self.texts(i)
        n_texts = 1 + i % cfg.max_texts
        out = {"images": image}
        if cfg.text_mode == "all":
            out["tokens"], out["mask"] = texts, np.arange(cfg.max_texts) < n_texts
        else:
            pick = 0 if cfg.text_mode == "original" else \
                np.random.default_rng([cfg.seed, self.epoch, int(i), 2]).integers(n_texts)
            out["tokens"] = texts[pick]
        if cfg.image_loss == "slip":
            rng = np.random.default_rng([cfg.seed, self.epoch, int(i), 3])
            out["view1"] = image + 0.3 * rng.standard_normal(image.shape, np.float32)
            out["view2"] = image + 0.3 * rng.standard_normal(image.shape, np.float32)
        return out

    def __iter__(self):
        b = self.cfg.micro_batch
        for k in range(self.start, self.batches_per_epoch()):
            first = k * self.world * b + self.rank * b
            samples = [self.sample(int(i)) for i in self.perm[first:first + b]]
            yield {key: torch.from_numpy(np.stack([x[key] for x in samples])) for key in samples[0]}
