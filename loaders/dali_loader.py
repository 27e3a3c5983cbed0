"""DALI pipeline over the packed webdataset tars: DALI's own reader, the per-sample work compiled.

    fn.readers.webdataset  ->  jpg, cap (compressed caption record), idx (global index, ASCII)
    fn.peek_image_shape    ->  image height and width from the JPEG header
    loaders.dali_ops.sample ->  one numba_function: index, crop boxes from (seed, epoch, index, h, w),
                                caption draw (zstd + draw_text_index + padding), no Python per sample
    fn.decoders.image_slice ->  decodes the crop window only (CPU here, "mixed" on a GPU), then resize
    crop_mirror_normalize   ->  float CHW (or uint8 HWC with normalize=False)

Order: the reader follows its index files line by line, with random access into the tar by offset. So
for each epoch the loader writes this rank's part of the EpochSampler order (from start_batch on) as one
small index file per shard visit, in a temporary folder, and lists the visited tars in order: DALI then
reads exactly the samples the FFCV and torch loaders read, in the same order, with its own threads.
Crops and texts are functions of (seed, epoch, index), so batches are bit-identical for a seed and a
resumed epoch continues with the crops and texts of the full one. Tokens are int32 (DALI's torch
iterator has no uint16).
"""
from __future__ import annotations

import shutil
import tempfile

import numpy as np
import torch

from loaders import augment as aug
from loaders.base import PackedLoader
from loaders.packed import PackError, ShardIndex

PREFETCH = 2                              # batches DALI prepares ahead
NO_AUGMENT = (-1.0, -1.0, 0.0, 0.0, 0)   # dali_ops.sample: a negative scale = the centred square


def _import_dali():
    try:
        from nvidia import dali  # noqa: F401
    except ImportError as e:
        raise ImportError("the DALI loader needs nvidia-dali (pip install nvidia-dali-cuda120); "
                          "use kind='torch'") from e


def _gpu_id() -> int | None:
    """The GPU for 'mixed' decoding when one is usable, else None (CPU-only pipeline)."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def build_pipeline(tars, indexes, *, op, resize, crc_table, batch_size, num_workers, image_size, slip_views, seed,
                   epoch,
                   device_id, normalize=True):
    """device_id: the GPU that decodes ("mixed"; images and crops come out on it), or None (CPU only).
    resize: a CPU resize operator (loaders.dali_ops.resize), or None for DALI's fn.resize (GPU images)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=max(1, num_workers), device_id=device_id,
                  prefetch_queue_depth=PREFETCH, exec_dynamic=True)
    def pipe():
        jpeg, record, idx = fn.readers.webdataset(
            paths=tars, index_paths=indexes, ext=["jpg", "cap", "idx"], dtypes=[types.UINT8] * 3,
            random_shuffle=False, pad_last_batch=True, name="reader")
        shape = fn.peek_image_shape(jpeg, dtype=types.INT64)
        params = types.Constant(np.array([seed, epoch, crc_table], dtype=np.int64), dtype=types.INT64, device="cpu")
        index, boxes, tokens = op(idx, shape, record, jpeg, params)
        # The one place the device matters: where JPEGs are decoded (and so where the crops live).
        # Indices, crop boxes and tokens come from the CPU op above on either path.
        decoder = "mixed" if device_id is not None else "cpu"

        def view(v):
            crop = fn.decoders.image_slice(jpeg, boxes[v, 0:2], boxes[v, 2:4], axis_names="HW",
                                           normalized_anchor=False, normalized_shape=False,
                                           device=decoder, output_type=types.RGB)
            if resize is not None:
                return resize(crop)
            return fn.resize(crop, size=[image_size, image_size])

        main = view(0)
        if normalize:
            main = fn.crop_mirror_normalize(main, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[m * 255 for m in aug.CLIP_MEAN],
                                            std=[s * 255 for s in aug.CLIP_STD])
        out = [main, tokens, index]
        if slip_views:  # raw uint8 crops; the SimCLR colour part runs batched in torch
            out += [view(1), view(2)]
        return tuple(out)

    return pipe()


class DaliLoader(PackedLoader):
    """Iterable of batches for one (rank, epoch)."""

    pipeline_normalizes = True  # crop_mirror_normalize hands out float CHW

    def __init__(self, root, config=None, **options):
        _import_dali()
        super().__init__(root, config, **options)
        c = self.config
        self.index = ShardIndex(self.packed)
        main = (*augment_scale(c.augment), 0)
        views = (main,) + (((*aug.SIMCLR_SCALE, *aug.CROP_RATIO, 1),
                            (*aug.SIMCLR_SCALE, *aug.CROP_RATIO, 2)) if c.slip_views else ())
        self.op_config = dict(mode=c.text_mode if c.draw_text else None, max_texts=c.max_texts, views=views,
                              check=c.check_records, weights=tuple(self.text_weights.tolist()))
        self.crcs = self.packed.record_crcs() if c.check_records else None  # kept alive: the op reads it
        self.kw = dict(batch_size=c.batch_size, num_workers=c.num_workers, image_size=c.image_size,
                       slip_views=c.slip_views, normalize=c.normalize, seed=c.seed, epoch=c.epoch)
        self.device_id = _gpu_id()
        # OpenCV's resize (INTER_AREA, as the FFCV loader) reads CPU images; GPU-decoded ones use DALI's
        self.cpu_resize = self.device_id is None

    def _op(self):
        from loaders.dali_ops.sample import sample_op
        from loaders.native import ddict
        from model.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID

        return sample_op(ddict=ddict(self.packed.dictionary), sot=SOT_TOKEN_ID, eot=EOT_TOKEN_ID,
                         **self.op_config)

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if len(self.sampler) == 0:
            return
        folder = tempfile.mkdtemp(prefix="laclip-dali-epoch-")
        try:
            tars, indexes = self.index.write_epoch(self.sampler, folder)
            from loaders.dali_ops.resize import resize_op

            crc_table = 0 if self.crcs is None else self.crcs.ctypes.data
            resize = resize_op(self.kw["image_size"]) if self.cpu_resize else None
            pipe = build_pipeline(tars, indexes, op=self._op(), resize=resize, crc_table=crc_table,
                                  device_id=self.device_id, **self.kw)
            names = ["images", "tokens", "index"] + (["v1", "v2"] if self.kw["slip_views"] else [])
            it = DALIGenericIterator([pipe], names, reader_name="reader", auto_reset=False,
                                     last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=False)
            batch = self.sampler.start_batch
            try:
                for out in it:
                    yield self._finish(out[0])
                    batch += 1
            except PackError:
                raise
            except RuntimeError as e:  # DALI stops the pipeline on a sample it cannot read or decode
                raise PackError(self._diagnose(batch, e)) from None
            finally:
                del it, pipe  # stops DALI's threads
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _diagnose(self, batch: int, error: RuntimeError) -> str:
        """Name the sample behind a DALI failure: DALI's message does not, so decode the JPEGs of the
        batches it may have been working on (the failed one and those prefetched after it)."""
        last = min(batch + PREFETCH + 2, self.sampler.num_batches)
        for b in range(batch, last):
            found = self.index.find_broken_jpeg(self.sampler.batch_indices(b))
            if found:
                return found
        lines = [ln for ln in str(error).splitlines() if ln.strip()]
        return (f"{self.packed.root}/dali: DALI stopped at batch {batch} of epoch {self.sampler.epoch}: "
                f"{lines[-1] if lines else error!r}")

    def _bad_record(self, index: int, flag: int) -> str:
        from loaders.dali_ops.sample import JPEG_CRC_MISMATCH, RECORD_CRC_MISMATCH

        if index < 0:
            return f"{self.packed.root}/dali: a sample's .idx member is not a decimal index (corrupted tar?)"
        where = f"{self.index.tar(self.index.locate(index)[0])}: sample {index} (key {self.index.key(index)!r})"
        if flag == JPEG_CRC_MISMATCH:
            return f"{where}: JPEG checksum mismatch with the pack's per-record CRC-32 (corrupted)"
        if flag == RECORD_CRC_MISMATCH:
            return f"{where}: caption record checksum mismatch with the pack's per-record CRC-32 (corrupted)"
        return (f"{self.index.tar(self.index.locate(index)[0])}: caption record of sample {index} "
                f"(key {self.index.key(index)!r}) does not decompress (corrupted?)")

    def _finish(self, d):
        raw = {"images": d["images"], "index": d["index"].view(-1)}
        flags = d["tokens"].flatten(1)[:, 0]
        if (flags < 0).any():
            row = int((flags < 0).nonzero()[0])
            raise PackError(self._bad_record(int(raw["index"][row]), int(flags[row])))
        if self.config.draw_text:
            raw["tokens"] = d["tokens"]
            if self.text_mode == "all":
                raw["mask"] = d["tokens"][:, :, 0] != 0  # a filled slot starts with sot
        if "v1" in d:
            raw["view1"], raw["view2"] = d["v1"], d["v2"]
        return self.finish(raw)


def augment_scale(on: bool) -> tuple:
    """(scale_lo, scale_hi, ratio_lo, ratio_hi) of the main view: the paper's crop, or the centred square."""
    return (*aug.CROP_SCALE, *aug.CROP_RATIO) if on else NO_AUGMENT[:4]
