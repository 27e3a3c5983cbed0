"""The caption decoder: decompress a sample's caption record, draw (or take all) its texts, pad them to
int32 tokens, inside FFCV's compiled pipeline (no Python per sample)."""
from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np

from loaders import native, sampling
from loaders.ffcv_ops.native_calls import crc32_of
from loaders.native import (CONTEXT_LENGTH, RECORD_CAPACITY, ZSTD_D_FORMAT, ZSTD_F_MAGICLESS, create_dctx,
                            decompress, free_dctx, is_error, memcpy, ref_ddict, set_param)

# This pipeline's own dispatchers of the shared caption draw and padding (loaders/dali_ops has its own)
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
                    if check and crc32_of(src[:n]) != crcs[sid]:
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
