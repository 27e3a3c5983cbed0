"""The seeded crop decoder: JPEG decode and random resized crop in one op, the box drawn from
(seed, epoch, index) so that same-seed runs and resumed epochs crop alike."""
from __future__ import annotations

import numba
import numpy as np

from loaders.ffcv_ops.native_calls import crc32_of, set_flag
from loaders.native import memcpy
from loaders.sampling import crop_box


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
                        if check and crc32_of(data) != crcs[sid]:
                            failed = True
                        if failed:
                            set_flag(bad_at + np.int64(sid))
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
