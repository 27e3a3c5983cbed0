"""FFCV loader over the packed .beton shards, with the caption draw as a compiled FFCV decoder.

Per field:
  image  -> RandomResizedCropRGBImageDecoder (decode + crop in one numba op; scale 0.5-1) -> ToTensor
  record -> CaptionDecoder (below): zstd-decompress the record with libzstd called through ctypes from
            numba (dictionary pre-loaded as a ZSTD_DDict), draw one text with the store's scalar
            draw_text_index, write sot + ids + eot padded to 77 int32 (or all texts, [max_texts, 77])
  index  -> IntDecoder -> ToTensor (global sample index, handed out with the batch)
so no Python runs per sample. Normalisation happens once per batch in torch (augment.normalize).

One ffcv Loader per shard file, built on first use and kept (numba compiles once per Loader; later
epochs reuse the compiled code). Our EpochSampler decides the order: a rank's positions are cut into
runs that stay in one shard, each run is fed to that shard's Loader as its index list, and the outputs
are re-cut into the sampler's batches. The epoch (which the compiled draw must see without a recompile)
lives in a small numpy array whose address the compiled code reads with memcpy each batch.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import replace
from pathlib import Path

import numba
import numpy as np
import torch

from loaders import store
from loaders.sampling import EpochSampler
from loaders.pack import PackError
from loaders.torch_loader import PackedMeta, finish_batch, read_meta, sample_key

CONTEXT_LENGTH = 77
RECORD_CAPACITY = 1 << 16  # bytes of one decompressed record; far above (M+1) x 75 tokens x 2 bytes


def _libzstd():
    lib = ctypes.CDLL("libzstd.so.1")
    sig = {
        "ZSTD_createDCtx": (ctypes.c_void_p, []),
        "ZSTD_freeDCtx": (ctypes.c_size_t, [ctypes.c_void_p]),
        "ZSTD_createDDict": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
        "ZSTD_decompressDCtx": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                                  ctypes.c_void_p, ctypes.c_size_t]),
        "ZSTD_isError": (ctypes.c_uint, [ctypes.c_size_t]),
        "ZSTD_DCtx_setParameter": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]),
        "ZSTD_DCtx_refDDict": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_void_p]),
    }
    for name, (res, args) in sig.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = res, args
    return lib


_ZSTD = _libzstd()
_create_dctx, _free_dctx = _ZSTD.ZSTD_createDCtx, _ZSTD.ZSTD_freeDCtx
_decompress, _is_error = _ZSTD.ZSTD_decompressDCtx, _ZSTD.ZSTD_isError
_set_param, _ref_ddict = _ZSTD.ZSTD_DCtx_setParameter, _ZSTD.ZSTD_DCtx_refDDict
# The store writes frames without the 4-byte magic (zstandard.FORMAT_ZSTD1_MAGICLESS): tell the context.
ZSTD_D_FORMAT, ZSTD_F_MAGICLESS = 1000, 1  # ZSTD_d_experimentalParam1, ZSTD_f_zstd1_magicless
_LIBZ = ctypes.CDLL("libz.so.1")
_crc32 = _LIBZ.crc32  # zlib's CRC-32, callable from compiled code (same value as Python's zlib.crc32)
_crc32.restype, _crc32.argtypes = ctypes.c_ulong, [ctypes.c_ulong, ctypes.c_void_p, ctypes.c_uint]
_memcpy = ctypes.CDLL(None).memcpy
_memcpy.restype, _memcpy.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_DDICTS: dict[bytes, tuple[int, np.ndarray]] = {}  # one DDict per dictionary, alive for the process


def _ddict(dictionary: bytes | None) -> int:
    if not dictionary:
        return 0
    if dictionary not in _DDICTS:
        buf = np.frombuffer(dictionary, dtype=np.uint8).copy()
        _DDICTS[dictionary] = (_ZSTD.ZSTD_createDDict(buf.ctypes.data, buf.size), buf)
    return _DDICTS[dictionary][0]


def _import_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError as e:  # the torch loader serves where FFCV is missing
        raise ImportError("the FFCV loader needs `ffcv` (pip install ffcv==1.0.2); use kind='torch'") from e


def check_beton(path: Path, num_samples: int) -> None:
    """A clear error for a missing or truncated .beton before FFCV reads past its end."""
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    if not path.is_file():
        raise PackError(f"{path}: missing shard")
    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise PackError(f"{path}: truncated ({size} bytes, smaller than the FFCV header)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    table_at = int(header["alloc_table_ptr"])
    if int(header["num_samples"]) != num_samples:
        raise PackError(f"{path}: {int(header['num_samples'])} samples, meta.json says {num_samples}")
    if table_at >= size or (size - table_at) % ALLOC_TABLE_TYPE.itemsize:
        raise PackError(f"{path}: truncated ({size} bytes, allocation table starts at {table_at})")
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_at)
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_at:
        raise PackError(f"{path}: truncated or corrupt (data pages end past the allocation table)")


def _caption_decoder_class():
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.operation import Operation

    draw = _draw

    class CaptionDecoder(Operation):
        """Decoder of the "record" BytesField: decompress, draw (or take all), pad to int32 tokens."""

        def __init__(self, *, ddict: int, params: np.ndarray, first_index: int, mode: str, max_texts: int,
                     sot: int, eot: int, crcs: np.ndarray | None = None):
            super().__init__()
            self.ddict, self.params, self.first_index = ddict, params, first_index
            self.mode, self.max_texts, self.sot, self.eot = mode, max_texts, sot, eot
            self.crcs = crcs  # the shard's record CRC-32s: checked when given

        def declare_state_and_memory(self, previous_state):
            shape = (self.max_texts, CONTEXT_LENGTH) if self.mode == "all" else (CONTEXT_LENGTH,)
            return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<i4")),
                    AllocationQuery(shape, dtype=np.dtype("<i4")))

        def generate_code(self):
            mem_read = self.memory_read
            ddict, params_at, first = self.ddict, self.params.ctypes.data, self.first_index
            mode = {"rewrite": 0, "original": 1, "all": 2}[self.mode]
            max_texts, sot, eot = self.max_texts, self.sot, self.eot
            check = self.crcs is not None
            crcs = self.crcs if check else np.zeros(1, dtype=np.uint32)

            def decode(batch_indices, destination, metadata, storage_state):
                params = np.empty(2, dtype=np.int64)  # (seed, epoch), read now: set per epoch from Python
                _memcpy(params.ctypes.data, params_at, 16)
                buf = np.empty(RECORD_CAPACITY, dtype=np.uint8)
                dctx = _create_dctx()
                _set_param(dctx, ZSTD_D_FORMAT, ZSTD_F_MAGICLESS)
                if ddict != 0:
                    _ref_ddict(dctx, ddict)
                for i in range(batch_indices.shape[0]):
                    sid = batch_indices[i]
                    src = mem_read(metadata[sid]["ptr"], storage_state)
                    n = metadata[sid]["size"]
                    if check and _crc32_of(src[:n]) != crcs[sid]:
                        destination[i].reshape(-1)[0] = -1
                        continue
                    got = _decompress(dctx, buf.ctypes.data, RECORD_CAPACITY, src.ctypes.data, n)
                    if _is_error(got):  # flagged with -1, raised in Python with the sample index
                        destination[i].reshape(-1)[0] = -1
                        continue
                    # record = uint16 LE [n, len_1..len_n, ids_1..., ids_n...] (loaders/store.py)
                    n_texts = (np.int64(buf[0]) | (np.int64(buf[1]) << 8)) if got >= 2 else 0
                    if 2 * (1 + n_texts) > got:  # malformed record: flag it
                        destination[i].reshape(-1)[0] = -1
                        continue
                    starts = np.empty(n_texts, dtype=np.int64)
                    lengths = np.empty(n_texts, dtype=np.int64)
                    at = 2 * (1 + n_texts)
                    for k in range(n_texts):
                        lengths[k] = np.int64(buf[2 + 2 * k]) | (np.int64(buf[3 + 2 * k]) << 8)
                        starts[k] = at
                        at += 2 * lengths[k]
                    if at != got:
                        destination[i].reshape(-1)[0] = -1
                        continue
                    out = destination[i]
                    out[:] = 0
                    if mode == 2:
                        for k in range(min(n_texts, max_texts)):
                            _pad(out[k], buf, starts[k], lengths[k], sot, eot)
                    else:
                        k = 0
                        if mode == 0 and n_texts > 1:
                            k = draw(params[0], params[1], first + np.int64(sid), n_texts)
                        if n_texts > 0:
                            _pad(out, buf, starts[k], lengths[k], sot, eot)
                _free_dctx(dctx)
                return destination

            return decode

    return CaptionDecoder


def _crop_decoder_class():
    """FFCV's ResizedCrop decoder with two changes.

    The random box is sampling.crop_box(seed, epoch, global index, ...) instead of FFCV's draw from
    numba's global generator (which no seed reaches), so same-seed runs and resumed epochs crop alike.
    Decoding goes into one warm buffer per thread instead of one per batch slot: FFCV decodes sample i
    of a batch into its own max_h x max_w x 3 slot, so every image lands in cache-cold memory (12 MB per
    batch of 64 at 256 px); reusing a thread's buffer cut the op's cost per image (256 px clip art).
    A JPEG that fails to decode, or whose CRC-32 differs from the pack's (when checked), is flagged in
    `bad` (by shard-local index; the loader raises for it)."""
    from ffcv.fields import rgb_image
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    from loaders.sampling import crop_box

    class SeededCropDecoder(rgb_image.ResizedCropRGBImageDecoder):
        def __init__(self, output_size, *, scale, ratio, params: np.ndarray, first_index: int, view: int,
                     bad: np.ndarray, warm: bool, crcs: np.ndarray | None = None):
            super().__init__(output_size)
            self.scale, self.ratio = scale, ratio  # scale None: centre crop of side ratio x short side
            self.params, self.first_index, self.view = params, first_index, view
            self.bad, self.warm, self.crcs = bad, warm, crcs

        @property
        def get_crop_generator(self):
            return rgb_image.get_center_crop

        def generate_code(self):
            mem_read, rows = self.memory_read, Compiler.get_iterator()
            decode_jpeg, crop_resize = Compiler.compile(imdecode), Compiler.compile(resize_crop)
            center_crop = Compiler.compile(rgb_image.get_center_crop)
            seeded = self.scale is not None
            scale = self.scale if seeded else (1.0, 1.0)
            ratio = self.ratio if seeded else (1.0, 1.0)
            center_ratio = 1.0 if seeded else float(self.ratio)
            params_at, first, view, warm = self.params.ctypes.data, self.first_index, self.view, self.warm
            bad_at, check = self.bad.ctypes.data, self.crcs is not None
            crcs = self.crcs if check else np.zeros(1, dtype=np.uint32)
            jpg = rgb_image.IMAGE_MODES["jpg"]

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, buffers = my_storage
                params = np.empty(2, dtype=np.int64)  # (seed, epoch), set per epoch from Python
                _memcpy(params.ctypes.data, params_at, 16)
                for k in rows(len(batch_indices)):
                    sid = batch_indices[k]
                    index = first + np.int64(sid)  # (uint64 + int64 would be float64 in numba)
                    field = metadata[sid]
                    data = mem_read(field["data_ptr"], storage_state)
                    h, w = np.uint32(field["height"]), np.uint32(field["width"])
                    if field["mode"] == jpg:
                        image = buffers[numba.get_thread_id() if warm else k]  # this thread's warm buffer
                        failed = decode_jpeg(data, image, h, w, h, w, 0, 0, 1, 1, False, False) != 0
                        if check and _crc32_of(data) != crcs[sid]:
                            failed = True
                        if failed:
                            _set_flag(bad_at + np.int64(sid))
                        image = image.reshape(-1)[:3 * h * w].reshape(h, w, 3)
                    else:
                        image = data.reshape(h, w, 3)
                    if seeded:
                        # one signature for every caller (int64 x 5, float64 x 4, int64): numba then
                        # compiles crop_box once, whatever the literal types here
                        top, left, ch, cw = crop_box(params[0], params[1], index, np.int64(h), np.int64(w),
                                                     np.float64(scale[0]), np.float64(scale[1]),
                                                     np.float64(ratio[0]), np.float64(ratio[1]), np.int64(view))
                    else:
                        top, left, ch, cw = center_crop(h, w, 0.0, center_ratio)
                    crop_resize(image, top, top + ch, left, left + cw, destination[k])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return SeededCropDecoder


_M1, _M2, _GOLDEN = store._M1, store._M2, store._GOLDEN


@numba.njit(nogil=True)
def _mix64(z):
    z = (z ^ (z >> numba.uint64(30))) * _M1
    z = (z ^ (z >> numba.uint64(27))) * _M2
    return z ^ (z >> numba.uint64(31))


@numba.njit(nogil=True)
def _draw(seed, epoch, index, n_texts):
    """store.draw_text_index for one sample, in uint64 integer math (tests check they agree)."""
    key = _mix64(numba.uint64(seed) * _GOLDEN + numba.uint64(epoch))
    h = _mix64(key ^ (numba.uint64(index) * _GOLDEN))
    return np.int64(h % numba.uint64(max(n_texts, 1)))


# ctypes calls wrapped in compiled functions: called directly inside FFCV's parallel (prange) loop,
# numba's parfor lowering fails on them (AssertionError on the return type)
@numba.njit(nogil=True)
def _crc32_of(data):
    return _crc32(0, data.ctypes.data, data.size)


@numba.njit(nogil=True)
def _set_flag(address):
    one = np.ones(1, dtype=np.uint8)
    _memcpy(address, one.ctypes.data, 1)


@numba.njit(nogil=True)
def _pad(out, buf, start, length, sot, eot):
    """sot + uint16 little-endian ids (cut to 75) + eot into a zeroed int32 row of 77."""
    n = min(length, CONTEXT_LENGTH - 2)
    out[0] = sot
    for j in range(n):
        out[1 + j] = np.int32(buf[start + 2 * j]) | (np.int32(buf[start + 2 * j + 1]) << 8)
    out[1 + n] = eot


class FfcvLoader:
    """Iterable of batches for one (rank, epoch) over the .beton shards."""

    _shard_loaders: dict = {}  # (path, config) -> (ffcv Loader, params array): kept across epochs

    def __init__(self, root, *, batch_size, text_mode, seed, epoch, rank=0, world_size=1, num_workers=1,
                 image_size=224, max_texts=5, slip_views=False, start_batch=0, drop_last=True, augment=True,
                 draw_text=True, return_dict=False, normalize=True, check_records=False):
        _import_ffcv()
        self.packed: PackedMeta = read_meta(root)
        self.sampler = EpochSampler(self.packed.shards, seed=seed, epoch=epoch, batch_size=batch_size,
                                    rank=rank, world_size=world_size, drop_last=drop_last,
                                    start_batch=start_batch)
        for shard in self.packed.meta["shards"]:
            check_beton(self._beton(shard["name"]), shard["num_samples"])
        self.config = dict(batch_size=batch_size, text_mode=text_mode if draw_text else None,
                           num_workers=num_workers, image_size=image_size, max_texts=max_texts,
                           slip_views=slip_views, augment=augment, check_records=check_records)
        self.crcs = self.packed.record_crcs() if check_records else None
        self.text_mode, self.return_dict = text_mode, return_dict or slip_views
        self.normalize = normalize

    def _beton(self, name: str) -> Path:
        return self.packed.root / "ffcv" / f"{name}.beton"

    def __len__(self):
        return len(self.sampler)

    _warm: set = set()  # keys of Loaders whose compiled code has run once

    def _key(self, shard: int):
        beton = self._beton(self.packed.meta["shards"][shard]["name"])
        return str(beton.resolve()), os.stat(beton).st_mtime_ns, tuple(sorted(self.config.items()))

    def _is_warm(self, shard: int) -> bool:
        return self._key(shard) in self._warm

    def _shard_loader(self, shard: int):
        key = self._key(shard)
        if key not in self._shard_loaders:
            self._shard_loaders[key] = self._build(shard)
        loader, params, keys, _ = self._shard_loaders[key]
        params[:] = (self.sampler.seed, self.sampler.epoch)
        return loader, keys

    def _bad_samples(self, index: torch.Tensor) -> list[int]:
        """Global indices of this batch whose JPEG the compiled decoder flagged (no decode, bad CRC)."""
        first = self.packed.shards.first_index
        shard = np.searchsorted(first, index.numpy(), side="right") - 1
        out = []
        for k in np.unique(shard):
            bad = self._shard_loaders.get(self._key(int(k)), (None,) * 4)[3]
            sel = index.numpy()[shard == k]
            if bad is not None and bad[sel - first[k]].any():
                out += sel[bad[sel - first[k]] != 0].tolist()
        return out

    def _build(self, shard: int):
        from ffcv.fields.decoders import IntDecoder
        from ffcv.loader import Loader
        from ffcv.loader import OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToTensor

        from loaders.augment import CROP_RATIO, CROP_SCALE, SIMCLR_SCALE
        from model.tokenizer import get_tokenizer

        c, size = self.config, (self.config["image_size"],) * 2
        first, n = int(self.packed.shards.first_index[shard]), int(self.packed.shards.sizes[shard])
        crcs = self.crcs[first:first + n] if self.crcs is not None else None
        params = np.zeros(2, dtype=np.int64)
        bad = np.zeros(n, dtype=np.uint8)  # set by the crop op for a JPEG that is corrupt
        crop_class = _crop_decoder_class()
        # one warm buffer per decode thread needs threads <= batch slots (the buffers FFCV allocates)
        common = dict(params=params, first_index=first, bad=bad, crcs=None if crcs is None else crcs[:, 0],
                      warm=c["num_workers"] <= c["batch_size"])

        if c["augment"]:
            image = crop_class(size, scale=CROP_SCALE, ratio=CROP_RATIO, view=0, **common)
        else:
            image = crop_class(size, scale=None, ratio=1.0, view=0, **common)
        pipelines = {"image": [image, ToTensor()], "index": [IntDecoder(), ToTensor()], "record_len": None}
        if c["text_mode"] is not None:
            tok = get_tokenizer()
            decoder = _caption_decoder_class()(
                ddict=_ddict(self.packed.dictionary), params=params, first_index=first, mode=c["text_mode"],
                max_texts=c["max_texts"], sot=tok.sot_token_id, eot=tok.eot_token_id,
                crcs=None if crcs is None else crcs[:, 1])
            pipelines["record"] = PipelineSpec("record", decoder=decoder, transforms=[ToTensor()])
        else:
            pipelines["record"] = None
        if c["slip_views"]:
            for view in (1, 2):
                pipelines[f"view{view}"] = PipelineSpec(
                    "image", crop_class(size, scale=SIMCLR_SCALE, ratio=CROP_RATIO, view=view, **common),
                    transforms=[ToTensor()])
        name = self.packed.meta["shards"][shard]["name"]
        loader = Loader(str(self._beton(name)), batch_size=c["batch_size"], num_workers=c["num_workers"],
                        order=OrderOption.SEQUENTIAL, drop_last=False, pipelines=pipelines,
                        indices=np.arange(1), batches_ahead=3)
        return loader, params, list(loader.pipeline_specs), bad  # output order: file fields, then views

    def _runs(self):
        """(shard, local ids) runs covering this rank's positions from start_batch: one per shard visit
        (at most one shard's ids in memory; a wrapped-round padding tail is a run of its own).
        FFCV cuts a run into batch_size chunks from its first id, so a visit that starts inside a batch
        is split: a head that completes that batch, then a rest that lands on batch bounds. Otherwise
        every later batch would straddle two chunks and be re-cut by a copy (14% of the CPU per epoch,
        measured on 256 px clip art)."""
        s = self.sampler
        lo = s.start_batch * s.batch_size
        stop = lo + s.positions_left()
        while lo < stop:
            pos = int(s.global_positions(lo, lo + 1)[0])
            visit = int(np.searchsorted(s.visit_ends, pos, side="right"))
            hi = min(stop, lo + int(s.visit_ends[visit]) - pos)
            shard = int(s.shard_order[visit])
            local = s.indices(lo, hi) - s.shards.first_index[shard]
            head = -lo % s.batch_size
            if 0 < head < len(local):
                yield shard, local[:head]
                local = local[head:]
            yield shard, local
            lo = hi

    def _start(self, run):
        """Start FFCV's reader thread on a run (it decodes ahead while the previous run is consumed)."""
        shard, local = run
        loader, keys = self._shard_loader(shard)
        loader.indices = loader.traversal_order.indices = local.astype(np.uint64)
        loader.first_traversal_order = loader.indices
        return iter(loader), keys

    def __iter__(self):
        s, pending, have = self.sampler, [], 0
        sizes = [s.batch_bounds(b)[1] - s.batch_bounds(b)[0] for b in range(s.start_batch, s.num_batches)]
        runs = self._runs()
        run = next(runs, None)
        current = self._start(run) if run is not None else None
        while current is not None:
            nxt = next(runs, None)
            # Prefetch the next run unless it reuses this run's Loader (one epoch iterator per Loader) or
            # its Loader has never run: numba compiles on first call, and two threads compiling the
            # shared jitted helpers at once can fail inside numba.
            ahead = None
            if nxt is not None and nxt[0] != run[0] and self._is_warm(nxt[0]):
                ahead = self._start(nxt)
            it, keys = current
            for out in it:
                self._warm.add(self._key(run[0]))
                chunk = dict(zip(keys, out))
                pending.append(chunk)
                have += len(chunk["index"])
                while sizes and have >= sizes[0]:
                    batch, pending, have = _take(pending, sizes[0], keys), [], have - sizes[0]
                    if have:  # keep the remainder (copied: FFCV reuses its buffers)
                        rest = {k: v.clone() for k, v in batch.pop("__rest__").items()}
                        pending = [rest]
                    batch.pop("__rest__", None)
                    sizes.pop(0)
                    yield self._finish(batch)
            if pending:  # the run ended mid-batch: its buffers go back to FFCV
                pending = [{k: v.clone() for k, v in p.items()} for p in pending]
            run = nxt
            current = ahead if ahead is not None else (self._start(nxt) if nxt is not None else None)

    def _finish(self, batch):
        raw = {"images": batch["image"], "index": batch["index"].view(-1).long()}
        bad = self._bad_samples(raw["index"])
        if bad:
            raise self._corrupt(bad[0], "JPEG does not decode" + (" or fails its checksum" if self.crcs is not None
                                                                 else ""))
        if "record" in batch:
            flagged = batch["record"].flatten(1)[:, 0] < 0
            if flagged.any():
                raise self._corrupt(int(raw["index"][flagged][0]), "caption record does not decompress"
                                    + (" or fails its checksum" if self.crcs is not None else ""))
            raw["tokens"] = batch["record"]
            if self.text_mode == "all":
                raw["mask"] = batch["record"][:, :, 0] != 0  # a filled slot starts with sot
        if "view1" in batch:
            raw["views"] = torch.stack([batch["view1"], batch["view2"]])
        s = self.sampler
        return finish_batch(raw, self.text_mode, self.return_dict, (s.seed, s.epoch), self.normalize)

    def _corrupt(self, index: int, what: str) -> PackError:
        shard = int(np.searchsorted(self.packed.shards.first_index, index, side="right")) - 1
        beton = self._beton(self.packed.meta["shards"][shard]["name"])
        return PackError(f"{beton}: sample {index} (key {sample_key(self.packed.root, index)}): {what} "
                         "(corrupted .beton?)")


def _take(pending: list[dict], n: int, keys: list[str]) -> dict:
    """Concatenate pending chunks and split off the first n samples (remainder under "__rest__")."""
    if len(pending) == 1 and len(pending[0]["index"]) == n:
        return dict(pending[0])
    joined = {k: torch.cat([p[k] for p in pending]) for k in keys}
    batch = {k: v[:n] for k, v in joined.items()}
    if len(joined["index"]) > n:
        batch["__rest__"] = {k: v[n:] for k, v in joined.items()}
    return batch
