"""The sample op: the per-sample work of the DALI pipeline as one compiled DALI operator (numba_function).

For every sample the webdataset reader hands over (JPEG, caption record, ".idx" member), the operator
  - parses the global sample index from the ".idx" member (ASCII digits),
  - computes each view's crop box from (seed, epoch, index, image height, width) with
    loaders.sampling.crop_box (the image size comes from the JPEG header: fn.peek_image_shape), so the
    crop never depends on DALI's own seed, worker count or where an epoch was resumed,
  - zstd-decompresses the caption record (libzstd through ctypes, dictionary pre-loaded as a DDict) and
    draws the text with loaders.sampling's caption draw, writing sot + ids + eot as int32 [77] (or all
    texts, [max_texts, 77]); a record that fails zstd's checksum or does not parse is flagged with -1 in
    its first token, which the loader turns into an error naming the sample.
Nothing here runs Python per sample. Operators are compiled once per configuration and process and
reused by every pipeline built later (DALI compiles a numba_function when it is constructed).
"""
from __future__ import annotations

import numba
import numpy as np

from loaders import native, sampling
from loaders.native import (CONTEXT_LENGTH, MAX_TEXTS, RECORD_CAPACITY, ZSTD_D_FORMAT, ZSTD_F_MAGICLESS, create_dctx,
                            decompress, free_dctx, is_error, memcpy, ref_ddict, set_param)

# Our own dispatchers of the shared draw, padding and crop code: FFCV's decoder threads compile their
# signatures of these functions at first use, and numba can fail when a dispatcher another caller has
# already compiled gets a new signature from two threads at once (seen as a hung FFCV epoch).
_draw = sampling.compiled_text_draw()
_pad = numba.njit(nogil=True)(native.pad_text)
crop_box = numba.njit(nogil=True)(sampling.crop_box.py_func)
_crc32 = native.crc32

MODES = {"rewrite": 0, "original": 1, "all": 2, None: 3}   # None: no caption (benchmarks' draw off)
BAD_RECORD, JPEG_CRC_MISMATCH, RECORD_CRC_MISMATCH = -1, -2, -3   # flags in a sample's first token


@numba.njit(nogil=True)
def parse_index(digits) -> np.int64:
    """The ".idx" member's ASCII decimal; -1 when it holds anything else."""
    if digits.shape[0] == 0:
        return np.int64(-1)
    value = np.int64(0)
    for c in digits:
        if c < 48 or c > 57:
            return np.int64(-1)
        value = value * 10 + (np.int64(c) - 48)
    return value


@numba.njit(nogil=True)
def unpack_record(dctx, buf, record, starts, lengths, styles) -> np.int64:
    """Decompress one record into buf and find its texts: the text count (texts k at buf[starts[k]:] with
    lengths[k] ids and style id styles[k], -1 = none), or -1 when the record is damaged. Layout: uint16 LE
    [n, word_1..word_n, ids...], word = length | (style id + 1) << 8 (loaders/caption_codec.py)."""
    got = decompress(dctx, buf.ctypes.data, RECORD_CAPACITY, record.ctypes.data, record.shape[0])
    if is_error(got) or got < 2:
        return np.int64(-1)
    n_texts = np.int64(buf[0]) | (np.int64(buf[1]) << 8)
    if 2 * (1 + n_texts) > got or n_texts > starts.shape[0]:
        return np.int64(-1)
    at = 2 * (1 + n_texts)
    for k in range(n_texts):
        lengths[k] = np.int64(buf[2 + 2 * k])
        styles[k] = np.int64(buf[3 + 2 * k]) - 1
        starts[k] = at
        at += 2 * lengths[k]
    return n_texts if at == got else np.int64(-1)


def _compile(mode: str | None, max_texts: int, views: tuple, check: bool, ddict: int, sot: int, eot: int,
             weights: tuple = ()):
    """A DALI NumbaFunction: (idx, image shape, record, jpeg, params) -> (index, boxes [views, 4], tokens).
    views: (scale_lo, scale_hi, ratio_lo, ratio_hi, view) per output image; scale_lo < 0 = centre square.
    params: seed, epoch and (check=True) the address of the uint32 [N, 2] table of per-record CRC-32s
    (JPEG, caption record) written at pack time, which the sample's bytes must match. weights: the
    caption draw's sampling.caption_weights as a tuple (empty: uniform)."""
    from nvidia.dali import types
    from nvidia.dali.plugin.numba.experimental import NumbaFunction

    mode_id, n_views = MODES[mode], len(views)
    view_table = np.array(views, dtype=np.float64)
    weight_table = np.array(weights, dtype=np.float64)
    token_shape = {0: (CONTEXT_LENGTH,), 1: (CONTEXT_LENGTH,), 2: (max_texts, CONTEXT_LENGTH), 3: (1,)}[mode_id]

    def setup(outs, ins):
        for s in range(len(outs[0])):
            outs[0][s][0] = 1
            outs[1][s][0], outs[1][s][1] = n_views, 4
            for d in range(len(token_shape)):
                outs[2][s][d] = token_shape[d]

    def run(index_out, boxes_out, tokens_out, idx_in, shape_in, record_in, jpeg_in, params_in):
        buf = np.empty(RECORD_CAPACITY, dtype=np.uint8)
        starts = np.empty(MAX_TEXTS, dtype=np.int64)
        lengths = np.empty(MAX_TEXTS, dtype=np.int64)
        styles = np.empty(MAX_TEXTS, dtype=np.int64)
        dctx = create_dctx()
        set_param(dctx, ZSTD_D_FORMAT, ZSTD_F_MAGICLESS)
        if ddict != 0:
            ref_ddict(dctx, ddict)
        for s in range(len(idx_in)):
            seed, epoch = params_in[s][0], params_in[s][1]
            index = parse_index(idx_in[s])
            index_out[s][0] = index
            height, width = shape_in[s][0], shape_in[s][1]
            for v in range(n_views):
                lo, hi, r_lo, r_hi, view = view_table[v]
                if lo < 0:  # no augmentation: the centred square
                    side = min(height, width)
                    box = ((height - side) // 2, (width - side) // 2, side, side)
                else:
                    box = crop_box(seed, epoch, max(index, 0), height, width, lo, hi, r_lo, r_hi, np.int64(view))
                for j in range(4):
                    boxes_out[s][v, j] = box[j]
            tokens = tokens_out[s]
            tokens[:] = 0
            if check and index >= 0:
                expected = np.empty(2, dtype=np.uint32)
                memcpy(expected.ctypes.data, params_in[s][2] + 8 * index, 8)
                if _crc32(0, jpeg_in[s].ctypes.data, jpeg_in[s].shape[0]) != expected[0]:
                    tokens.reshape(-1)[0] = JPEG_CRC_MISMATCH
                    continue
                if _crc32(0, record_in[s].ctypes.data, record_in[s].shape[0]) != expected[1]:
                    tokens.reshape(-1)[0] = RECORD_CRC_MISMATCH
                    continue
            if mode_id == 3:
                continue
            n_texts = unpack_record(dctx, buf, record_in[s], starts, lengths, styles) if index >= 0 else -1
            if n_texts < 0:
                tokens.reshape(-1)[0] = BAD_RECORD
            elif mode_id == 2:
                for k in range(min(n_texts, max_texts)):
                    _pad(tokens[k], buf, starts[k], lengths[k], sot, eot)
            elif n_texts > 0:
                k = _draw(seed, epoch, index, n_texts, weight_table, styles) if mode_id == 0 and n_texts > 1 else 0
                _pad(tokens, buf, starts[k], lengths[k], sot, eot)
        free_dctx(dctx)

    return NumbaFunction(run_fn=run, setup_fn=setup, batch_processing=True,
                         out_types=[types.INT64, types.FLOAT, types.INT32],
                         in_types=[types.UINT8, types.INT64, types.UINT8, types.UINT8, types.INT64],
                         outs_ndim=[1, 2, len(token_shape)], ins_ndim=[1, 1, 1, 1, 1])


_COMPILED: dict = {}


def sample_op(mode: str | None, max_texts: int, views: tuple, check: bool, ddict: int, sot: int, eot: int,
              weights: tuple = ()):
    """The compiled operator for this configuration, built on first use and kept for the process."""
    key = (mode, max_texts, views, check, ddict, sot, eot, tuple(weights))
    if key not in _COMPILED:
        _COMPILED[key] = _compile(*key)
    return _COMPILED[key]
