"""FFCV pipeline operations: the caption decoder and the seeded crop decoder (numba, no Python per sample).

  record -> CaptionDecoder: zstd-decompress the record with libzstd called through ctypes from numba
            (dictionary pre-loaded as a ZSTD_DDict), draw one text with sampling's caption draw, write
            sot + ids + eot padded to 77 int32 (or all texts, [max_texts, 77])
  image  -> SeededCropDecoder: decode + crop in one op, the box from sampling.crop_box(seed, epoch, index)
The classes are built on first use (FFCV is imported only when its loader is). Both read (seed, epoch)
from a small numpy array whose address the compiled code copies each batch, so a new epoch needs no
recompile. A damaged sample is flagged (-1 in its first token, or in the `bad` array), never raised
inside compiled code: the loader raises for it in Python with the sample's name.
"""
from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np

from loaders import native, sampling
from loaders.native import (CONTEXT_LENGTH, RECORD_CAPACITY, ZSTD_D_FORMAT, ZSTD_F_MAGICLESS, crc32, create_dctx,
                            decompress, free_dctx, is_error, memcpy, ref_ddict, set_param)
from loaders.sampling import crop_box

# This pipeline's own dispatchers of the shared caption draw and padding (loaders/dali_ops.py has its own)
_draw = sampling.compiled_text_draw()
_pad = numba.njit(nogil=True)(native.pad_text)


def caption_decoder_class():
    """The CaptionDecoder Operation class (defined here on first use: its base class is FFCV's)."""
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.operation import Operation

    draw = _draw

    class CaptionDecoder(Operation):
        """Decoder of the "record" BytesField: decompress, draw (or take all), pad to int32 tokens."""

        def __init__(self, *, ddict: int, params: np.ndarray, first_index: int, mode: str, max_texts: int,
                     sot: int, eot: int, crcs: np.ndarray | None = None, weights: np.ndarray = sampling.UNIFORM):
            super().__init__()
            self.ddict, self.params, self.first_index = ddict, params, first_index
            self.mode, self.max_texts, self.sot, self.eot = mode, max_texts, sot, eot
            self.crcs = crcs  # the shard's record CRC-32s: checked when given
            self.weights = np.array(weights, dtype=np.float64)  # sampling.caption_weights (empty: uniform)

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
            weights = self.weights

            def decode(batch_indices, destination, metadata, storage_state):
                params = np.empty(2, dtype=np.int64)  # (seed, epoch), read now: set per epoch from Python
                memcpy(params.ctypes.data, params_at, 16)
                buf = np.empty(RECORD_CAPACITY, dtype=np.uint8)
                dctx = create_dctx()
                set_param(dctx, ZSTD_D_FORMAT, ZSTD_F_MAGICLESS)
                if ddict != 0:
                    ref_ddict(dctx, ddict)
                for i in range(batch_indices.shape[0]):
                    sid = batch_indices[i]
                    src = mem_read(metadata[sid]["ptr"], storage_state)
                    n = metadata[sid]["size"]
                    if check and _crc32_of(src[:n]) != crcs[sid]:
                        destination[i].reshape(-1)[0] = -1
                        continue
                    got = decompress(dctx, buf.ctypes.data, RECORD_CAPACITY, src.ctypes.data, n)
                    if is_error(got):  # flagged with -1, raised in Python with the sample index
                        destination[i].reshape(-1)[0] = -1
                        continue
                    # record = uint16 LE [n, word_1..word_n, ids_1..., ids_n...] (loaders/caption_codec.py)
                    n_texts = (np.int64(buf[0]) | (np.int64(buf[1]) << 8)) if got >= 2 else 0
                    if 2 * (1 + n_texts) > got:  # malformed record: flag it
                        destination[i].reshape(-1)[0] = -1
                        continue
                    starts = np.empty(n_texts, dtype=np.int64)
                    lengths = np.empty(n_texts, dtype=np.int64)
                    styles = np.empty(n_texts, dtype=np.int64)
                    at = 2 * (1 + n_texts)
                    for k in range(n_texts):  # length word: length (low byte), style id + 1 (high byte)
                        lengths[k] = np.int64(buf[2 + 2 * k])
                        styles[k] = np.int64(buf[3 + 2 * k]) - 1
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
                            k = draw(params[0], params[1], first + np.int64(sid), n_texts, weights, styles)
                        if n_texts > 0:
                            _pad(out, buf, starts[k], lengths[k], sot, eot)
                free_dctx(dctx)
                return destination

            return decode

    return CaptionDecoder


def crop_decoder_class():
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
                memcpy(params.ctypes.data, params_at, 16)
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


# ctypes calls wrapped in compiled functions: called directly inside FFCV's parallel (prange) loop,
# numba's parfor lowering fails on them (AssertionError on the return type)
@numba.njit(nogil=True)
def _crc32_of(data):
    return crc32(0, data.ctypes.data, data.size)


@numba.njit(nogil=True)
def _set_flag(address):
    one = np.ones(1, dtype=np.uint8)
    memcpy(address, one.ctypes.data, 1)
