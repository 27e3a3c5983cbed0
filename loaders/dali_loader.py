"""DALI pipeline over the packed webdataset tars, caption draw inside the pipeline.

A parallel external source (worker processes, batch=False) maps each sample slot of the epoch through
our EpochSampler to a global index, slices the JPEG bytes and the caption record out of the
memory-mapped tar (offsets from the .idx), decompresses the record and draws the text with
draw_text_index(seed, epoch, index, n) -- so the texts equal the other loaders' -- and returns
(jpeg uint8, tokens int32 [77] or [max_texts, 77], mask uint8 [max_texts], index int64). DALI then
decodes (CPU here, "mixed" on a GPU, chosen at run time), crops (random_resized_crop, area 0.5-1) and
normalises to float CHW (crop_mirror_normalize). Tokens are int32: DALI's torch iterator has no uint16.
"""
from __future__ import annotations

import numpy as np
import torch

from loaders import augment
from loaders.sampling import EpochSampler
from loaders.store import RecordCodec
from loaders.torch_loader import TarShards, read_meta, texts_for


def _import_dali():
    try:
        from nvidia import dali  # noqa: F401
    except ImportError as e:
        raise ImportError("the DALI loader needs nvidia-dali (pip install nvidia-dali-cuda120); "
                          "use kind='torch'") from e


def _gpu_id() -> int | None:
    """The GPU for 'mixed' decoding when one is usable, else None (CPU-only pipeline)."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def _start_method() -> str:
    """fork is fastest, but a forked child must not inherit a live CUDA context: spawn once one exists."""
    return "spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "fork"


class _Source:
    """Per-sample callback of the parallel external source (pickled into DALI's worker processes)."""

    def __init__(self, shards: TarShards, sampler: EpochSampler, *, text_mode, max_texts, draw_text):
        self.shards, self.sampler = shards, sampler
        self.text_mode, self.max_texts, self.draw_text = text_mode, max_texts, draw_text
        self.start = sampler.start_batch * sampler.batch_size
        self.left = sampler.positions_left()
        # Slots: whole batches; a partial last batch is padded by repeating its samples (trimmed later).
        self.slots = len(sampler) * sampler.batch_size
        self.codec = None

    def __call__(self, info):
        if info.idx_in_epoch >= self.slots:
            raise StopIteration
        pos = info.idx_in_epoch
        if pos >= self.left:  # padding slot of a partial last batch
            last = self.left - (self.left - 1) % self.sampler.batch_size - 1
            pos = last + (pos - last) % (self.left - last)
        index = int(self.sampler.indices(self.start + pos, self.start + pos + 1)[0])
        jpeg = np.frombuffer(self.shards.jpeg(index), dtype=np.uint8)
        mask = np.zeros(self.max_texts, dtype=np.uint8)
        if not self.draw_text:
            tokens = np.zeros(77, dtype=np.int32)
        else:
            if self.codec is None:
                self.codec = RecordCodec(self.shards.packed.dictionary)
            tokens, m = texts_for(self.codec, self.shards.record(index), index, mode=self.text_mode,
                                  seed=self.sampler.seed, epoch=self.sampler.epoch, max_texts=self.max_texts)
            if m is not None:
                mask[:] = m
        return jpeg, tokens, mask, np.array([index], dtype=np.int64)


def build_pipeline(source: _Source, *, batch_size, num_workers, image_size, augment_images, slip_views,
                   seed, device_id, normalize=True):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=max(1, num_workers), device_id=device_id,
                  py_num_workers=max(1, num_workers), py_start_method=_start_method(), seed=seed,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def pipe():
        jpeg, tokens, mask, index = fn.external_source(source=source, num_outputs=4, batch=False,
                                                       parallel=True, prefetch_queue_depth=2)
        decoder = "mixed" if device_id is not None else "cpu"
        images = fn.decoders.image(jpeg, device=decoder, output_type=types.RGB)
        mean = [m * 255 for m in augment.CLIP_MEAN]
        std = [s * 255 for s in augment.CLIP_STD]
        size = [image_size, image_size]

        def crop(scale):
            if augment_images:
                return fn.random_resized_crop(images, size=size, random_area=list(scale),
                                              random_aspect_ratio=list(augment.CROP_RATIO))
            short = fn.resize(images, resize_shorter=image_size)
            return fn.crop(short, crop=size)

        main = crop(augment.CROP_SCALE)
        if normalize:
            main = fn.crop_mirror_normalize(main, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
        out = [main, tokens, mask, index]
        if slip_views:  # raw uint8 crops; the SimCLR colour part runs batched in torch
            out += [crop(augment.SIMCLR_SCALE), crop(augment.SIMCLR_SCALE)]
        return tuple(out)

    return pipe()


class DaliLoader:
    """Iterable of batches for one (rank, epoch)."""

    def __init__(self, root, *, batch_size, text_mode, seed, epoch, rank=0, world_size=1, num_workers=1,
                 image_size=224, max_texts=5, slip_views=False, start_batch=0, drop_last=True, augment=True,
                 draw_text=True, return_dict=False, normalize=True):
        _import_dali()
        packed = read_meta(root)
        self.sampler = EpochSampler(packed.shards, seed=seed, epoch=epoch, batch_size=batch_size, rank=rank,
                                    world_size=world_size, drop_last=drop_last, start_batch=start_batch)
        self.source = _Source(TarShards(packed), self.sampler, text_mode=text_mode, max_texts=max_texts,
                              draw_text=draw_text)
        self.kw = dict(batch_size=batch_size, num_workers=num_workers, image_size=image_size,
                       augment_images=augment, slip_views=slip_views, normalize=normalize,
                       seed=(seed * 1_000_003 + epoch * 1009 + rank) % (2**31))
        self.text_mode, self.draw_text = text_mode, draw_text
        self.return_dict = return_dict or slip_views
        self.generator = torch.Generator().manual_seed(hash((seed, epoch, rank)) & 0x7FFFFFFF)

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if len(self.sampler) == 0:
            return
        device_id = _gpu_id()
        pipe = build_pipeline(self.source, device_id=device_id, **self.kw)
        names = ["images", "tokens", "mask", "index"] + (["v1", "v2"] if self.kw["slip_views"] else [])
        it = DALIGenericIterator([pipe], names, last_batch_policy=LastBatchPolicy.DROP, auto_reset=False,
                                 prepare_first_batch=False)
        try:
            left = self.sampler.positions_left()
            for out in it:
                d = out[0]
                n = min(self.sampler.batch_size, left)
                left -= n
                yield self._finish({k: v[:n] for k, v in d.items()})
        finally:
            del it, pipe  # stops the worker processes

    def _finish(self, d):
        images = d["images"] if self.kw["normalize"] else d["images"].permute(0, 3, 1, 2)
        out = {"images": images, "index": d["index"].view(-1)}
        if self.draw_text:
            out["tokens"] = d["tokens"]
            if self.text_mode == "all":
                out["mask"] = d["mask"].bool()
        if "v1" in d:
            out["view1"] = augment.simclr_view(d["v1"], self.generator)
            out["view2"] = augment.simclr_view(d["v2"], self.generator)
        if self.return_dict:
            return out
        if not self.draw_text:
            return (out["images"],)
        if self.text_mode == "all":
            return out["images"], out["tokens"], out["mask"]
        return out["images"], out["tokens"]
