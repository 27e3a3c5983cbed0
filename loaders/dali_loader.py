"""DALI pipeline over the packed webdataset tars: DALI's own reader, the per-sample work compiled.

    fn.readers.webdataset  ->  jpg, cap (compressed caption record), idx (global index, ASCII)
    fn.peek_image_shape    ->  image height and width from the JPEG header
    loaders.dali_ops       ->  one numba_function: index, crop boxes from (seed, epoch, index, h, w),
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

import os
import shutil
import tempfile

import numpy as np
import torch

from loaders import augment as aug
from loaders.pack import IDX_VERSION, PackError
from loaders.sampling import EpochSampler
from loaders.torch_loader import PackedMeta, read_meta

PREFETCH = 2                              # batches DALI prepares ahead
NO_AUGMENT = (-1.0, -1.0, 0.0, 0.0, 0)   # dali_ops: a negative scale = the centred square


def _import_dali():
    try:
        from nvidia import dali  # noqa: F401
    except ImportError as e:
        raise ImportError("the DALI loader needs nvidia-dali (pip install nvidia-dali-cuda120); "
                          "use kind='torch'") from e


def _gpu_id() -> int | None:
    """The GPU for 'mixed' decoding when one is usable, else None (CPU-only pipeline)."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


class ShardIndex:
    """The lines of each shard's DALI index file (one sample per line), read when a shard is first used."""

    def __init__(self, packed: PackedMeta):
        self.packed = packed
        self._lines: dict[int, np.ndarray] = {}

    def tar(self, shard: int) -> str:
        return str(self.packed.root / "dali" / f"{self.packed.shard_names[shard]}.tar")

    def lines(self, shard: int) -> np.ndarray:
        if shard not in self._lines:
            path = self.tar(shard)[:-4] + ".idx"
            if not os.path.isfile(path):
                raise PackError(f"{path}: missing tar index")
            with open(path, "rb") as f:
                head, *rows = f.read().splitlines()
            n = int(self.packed.shards.sizes[shard])
            if head.split() != [IDX_VERSION.encode(), str(n).encode()] or len(rows) != n:
                raise PackError(f"{path}: expected a '{IDX_VERSION} {n}' index with {n} lines")
            self._lines[shard] = np.array(rows, dtype=object)
        return self._lines[shard]

    def locate(self, index: int) -> tuple[int, list[bytes]]:
        shard = int(np.searchsorted(self.packed.shards.first_index, index, side="right")) - 1
        return shard, self.lines(shard)[index - int(self.packed.shards.first_index[shard])].split()

    def key(self, index: int) -> str:
        """The sample key of a global index (for error messages)."""
        return self.locate(index)[1][3].decode().rsplit(".", 1)[0]

    def jpeg(self, index: int) -> tuple[str, bytes]:
        """(tar path, JPEG bytes) of a global index, read directly (error diagnosis only)."""
        shard, parts = self.locate(index)
        at = parts.index(b"jpg")
        offset, size = int(parts[at + 1]), int(parts[at + 2])
        with open(self.tar(shard), "rb") as f:
            f.seek(offset)
            return self.tar(shard), f.read(size)

    def find_broken_jpeg(self, indices) -> str | None:
        """'<tar>: JPEG of sample i (key k) does not decode (why)' for the first of indices that fails."""
        import simplejpeg

        for i in map(int, indices):
            tar, data = self.jpeg(i)
            try:
                simplejpeg.decode_jpeg(data, colorspace="RGB")
            except ValueError as e:
                return f"{tar}: JPEG of sample {i} (key {self.key(i)!r}) does not decode ({e})"
        return None

    def write_epoch(self, sampler: EpochSampler, folder: str) -> tuple[list[str], list[str]]:
        """Index files for this rank's positions from start_batch on, one per run of one shard, in order.
        Returns (tar paths, index paths) for fn.readers.webdataset."""
        lo = sampler.start_batch * sampler.batch_size
        order = sampler.indices(lo, lo + sampler.positions_left())
        shard_of = np.searchsorted(self.packed.shards.first_index, order, side="right") - 1
        cuts = np.flatnonzero(np.diff(shard_of)) + 1
        tars, indexes = [], []
        for k, (a, b) in enumerate(zip([0, *cuts.tolist()], [*cuts.tolist(), len(order)])):
            shard = int(shard_of[a])
            rows = self.lines(shard)[order[a:b] - self.packed.shards.first_index[shard]]
            path = os.path.join(folder, f"run-{k:06d}.idx")
            with open(path, "wb") as f:
                f.write(f"{IDX_VERSION} {b - a}\n".encode() + b"\n".join(rows) + b"\n")
            tars.append(self.tar(shard))
            indexes.append(path)
        return tars, indexes


def build_pipeline(tars, indexes, *, op, resize, crc_table, batch_size, num_workers, image_size, slip_views, seed, epoch,
                   device_id, normalize=True):
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
        decoder = "mixed" if device_id is not None else "cpu"

        def view(v):
            crop = fn.decoders.image_slice(jpeg, boxes[v, 0:2], boxes[v, 2:4], axis_names="HW",
                                           normalized_anchor=False, normalized_shape=False,
                                           device=decoder, output_type=types.RGB)
            if decoder == "cpu" and resize is not None:
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


class DaliLoader:
    """Iterable of batches for one (rank, epoch)."""

    def __init__(self, root, *, batch_size, text_mode, seed, epoch, rank=0, world_size=1, num_workers=1,
                 image_size=224, max_texts=5, slip_views=False, start_batch=0, drop_last=True, augment=True,
                 draw_text=True, return_dict=False, normalize=True, check_records=False):
        _import_dali()
        self.packed = read_meta(root)
        self.sampler = EpochSampler(self.packed.shards, seed=seed, epoch=epoch, batch_size=batch_size,
                                    rank=rank, world_size=world_size, drop_last=drop_last,
                                    start_batch=start_batch)
        self.index = ShardIndex(self.packed)
        main = (*augment_scale(augment), 0)
        views = (main,) + (((*aug.SIMCLR_SCALE, *aug.CROP_RATIO, 1),
                            (*aug.SIMCLR_SCALE, *aug.CROP_RATIO, 2)) if slip_views else ())
        self.op_config = dict(mode=text_mode if draw_text else None, max_texts=max_texts, views=views,
                              check=check_records)
        self.crcs = self.packed.record_crcs() if check_records else None  # kept alive: the op reads it
        self.kw = dict(batch_size=batch_size, num_workers=num_workers, image_size=image_size,
                       slip_views=slip_views, normalize=normalize, seed=seed, epoch=epoch)
        self.text_mode, self.draw_text = text_mode, draw_text
        self.return_dict = return_dict or slip_views

    def __len__(self):
        return len(self.sampler)

    def _op(self):
        from loaders.dali_ops import sample_op
        from loaders.ffcv_loader import _ddict
        from model.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID

        return sample_op(ddict=_ddict(self.packed.dictionary), sot=SOT_TOKEN_ID, eot=EOT_TOKEN_ID,
                         **self.op_config)

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if len(self.sampler) == 0:
            return
        folder = tempfile.mkdtemp(prefix="laclip-dali-epoch-")
        try:
            tars, indexes = self.index.write_epoch(self.sampler, folder)
            from loaders.dali_ops import resize_op

            crc_table = 0 if self.crcs is None else self.crcs.ctypes.data
            pipe = build_pipeline(tars, indexes, op=self._op(), resize=resize_op(self.kw["image_size"]),
                                  crc_table=crc_table, device_id=_gpu_id(), **self.kw)
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
        from loaders.dali_ops import JPEG_CRC_MISMATCH, RECORD_CRC_MISMATCH

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
        images = d["images"] if self.kw["normalize"] else d["images"].permute(0, 3, 1, 2)
        out = {"images": images, "index": d["index"].view(-1)}
        flags = d["tokens"].flatten(1)[:, 0]
        if (flags < 0).any():
            row = int((flags < 0).nonzero()[0])
            raise PackError(self._bad_record(int(out["index"][row]), int(flags[row])))
        if self.draw_text:
            out["tokens"] = d["tokens"]
            if self.text_mode == "all":
                out["mask"] = d["tokens"][:, :, 0] != 0  # a filled slot starts with sot
        if "v1" in d:  # colour part per sample from (seed, epoch, index, view), like the crops
            seed, epoch, index = self.sampler.seed, self.sampler.epoch, out["index"].numpy()
            out["view1"] = aug.simclr_view_seeded(d["v1"], seed, epoch, index, 1)
            out["view2"] = aug.simclr_view_seeded(d["v2"], seed, epoch, index, 2)
        if self.return_dict:
            return out
        if not self.draw_text:
            return (out["images"],)
        if self.text_mode == "all":
            return out["images"], out["tokens"], out["mask"]
        return out["images"], out["tokens"]


def augment_scale(on: bool) -> tuple:
    """(scale_lo, scale_hi, ratio_lo, ratio_hi) of the main view: the paper's crop, or the centred square."""
    return (*aug.CROP_SCALE, *aug.CROP_RATIO) if on else NO_AUGMENT[:4]
