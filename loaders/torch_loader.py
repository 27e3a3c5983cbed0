"""Plain torch DataLoader over a packed dataset, for machines with neither FFCV nor DALI.

It reads the DALI tars directly: the webdataset index (.idx) gives each member's offset, so a sample is
two slices of a memory-mapped tar (JPEG and caption record), with no tar parsing at load time. A worker
process produces whole batches (map-style over batch numbers); every random choice is a function of
(seed, epoch, global index): the crop box is sampling.crop_box, the text draw_text_index, SLIP's colour
parameters augment.simclr_view_seeded. So the batch content is the same for any worker count and
`start_batch` simply starts the batch range later. Decoding is simplejpeg (libjpeg-turbo), the crop is cv2.

A sample that does not decode (corrupted JPEG or caption record) raises PackError naming the tar, the
sample's key and index; the error reaches the training loop and the workers are shut down (they keep the
default SIGTERM handling: a worker that ignored it would hang its parent's exit forever).
"""
from __future__ import annotations

import numpy as np
import simplejpeg
import torch
import zstandard

from loaders import augment
from loaders.base import PackedLoader
from loaders.packed import PackError, TarShards
from loaders.sampling import UNIFORM, EpochSampler, crop_box, draw_text_index
from loaders.caption_codec import RecordCodec, pad_tokens

CONTEXT_LENGTH = 77


def texts_for(codec: RecordCodec, record: bytes, index: int, *, mode: str, seed: int, epoch: int,
              max_texts: int, weights: np.ndarray = UNIFORM) -> tuple[np.ndarray, np.ndarray | None]:
    """The tokens of one sample: int32 [77] (rewrite/original) or ([max_texts,77], mask) in all mode."""
    texts, styles = codec.decode_styled(record)
    if mode == "all":
        tokens = np.zeros((max_texts, CONTEXT_LENGTH), dtype=np.int32)
        mask = np.zeros(max_texts, dtype=bool)
        for k, ids in enumerate(texts[:max_texts]):
            tokens[k], mask[k] = pad_tokens(ids), True
        return tokens, mask
    k = 0 if mode == "original" else int(draw_text_index(seed, epoch, index, len(texts), weights, styles))
    return pad_tokens(texts[k]), None


class _Batches(torch.utils.data.Dataset):
    """Map-style over batch numbers: item b = the whole batch b of this rank's epoch order."""

    def __init__(self, shards: TarShards, sampler: EpochSampler, *, text_mode, max_texts, image_size,
                 augment_images, slip_views, draw_text=True, check_records=False, text_weights=UNIFORM):
        self.shards, self.sampler = shards, sampler
        self.text_mode, self.max_texts, self.image_size = text_mode, max_texts, image_size
        self.augment_images, self.slip_views, self.draw_text = augment_images, slip_views, draw_text
        self.check_records, self.text_weights = check_records, text_weights
        self.codec = RecordCodec(shards.packed.dictionary)

    def __len__(self):
        return self.sampler.num_batches

    def _crop(self, img: np.ndarray, index: int, view: int) -> np.ndarray:
        s, (h, w) = self.sampler, img.shape[:2]
        if view:
            box = crop_box(s.seed, s.epoch, index, h, w, *augment.SIMCLR_SCALE, *augment.CROP_RATIO, view)
        elif self.augment_images:
            box = crop_box(s.seed, s.epoch, index, h, w, *augment.CROP_SCALE, *augment.CROP_RATIO)
        else:
            box = augment.center_crop_box(h, w)
        return augment.crop_resize(img, box, self.image_size)

    def __getitem__(self, b: int):
        s = self.sampler
        indices = s.batch_indices(b)
        size, n = self.image_size, len(indices)
        images = np.empty((n, size, size, 3), dtype=np.uint8)
        views = np.empty((2, n, size, size, 3), dtype=np.uint8) if self.slip_views else None
        tokens, masks = [], []
        for j, index in enumerate(indices.tolist()):
            jpeg = self.shards.jpeg(index)
            if self.check_records:
                self.shards.check(index, jpeg, 0)
            try:
                img = simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
            except ValueError as e:
                raise self.shards.error(index, f"JPEG does not decode ({e})") from None
            images[j] = self._crop(img, index, 0)
            if views is not None:
                views[0, j], views[1, j] = self._crop(img, index, 1), self._crop(img, index, 2)
            if self.draw_text:
                record = self.shards.record(index)
                if self.check_records:
                    self.shards.check(index, record, 1)
                try:
                    t, m = texts_for(self.codec, record, index, mode=self.text_mode,
                                     seed=s.seed, epoch=s.epoch, max_texts=self.max_texts,
                                     weights=self.text_weights)
                except (zstandard.ZstdError, ValueError, IndexError) as e:
                    raise self.shards.error(index, f"caption record does not decode ({e})") from None
                tokens.append(t)
                masks.append(m)
        out = {"images": torch.from_numpy(images), "index": torch.from_numpy(indices)}
        if tokens:
            out["tokens"] = torch.from_numpy(np.stack(tokens))
            if self.text_mode == "all":
                out["mask"] = torch.from_numpy(np.stack(masks))
        if views is not None:
            out["views"] = torch.from_numpy(views)
        return out


class TorchLoader(PackedLoader):
    """Iterable of batches for one (rank, epoch); len() = batches left from start_batch."""

    def __init__(self, root, config=None, **options):
        super().__init__(root, config, **options)
        c = self.config
        self.dataset = _Batches(TarShards(self.packed, c.check_records), self.sampler, text_mode=c.text_mode,
                                max_texts=c.max_texts, image_size=c.image_size, augment_images=c.augment,
                                slip_views=c.slip_views, draw_text=c.draw_text, check_records=c.check_records,
                                text_weights=self.text_weights)

    def __iter__(self):
        order = range(self.sampler.start_batch, self.sampler.num_batches)
        workers = self.config.num_workers
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, sampler=order, num_workers=workers,
            prefetch_factor=4 if workers else None, persistent_workers=False)
        try:
            for raw in loader:
                if "views" in raw:
                    raw["view1"], raw["view2"] = raw.pop("views")
                yield self.finish(raw)
        except PackError as err:  # from a worker, torch's message adds the worker's traceback: keep one line
            raise PackError(worker_error_line(err)) from None


def worker_error_line(err: Exception) -> str:
    """The error's own line from a DataLoader worker's re-raised exception ("Caught X in DataLoader worker
    process 0. Original Traceback ... module.X: the message"); the message itself otherwise."""
    lines = str(err).strip().splitlines()
    if len(lines) < 2 or not lines[0].startswith("Caught "):
        return str(err)
    return lines[-1].removeprefix(f"{type(err).__module__}.{type(err).__qualname__}: ")
