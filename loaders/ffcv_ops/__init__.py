"""FFCV pipeline operations, one module each (like FFCV's own transforms/), built on first use: FFCV is
imported only when its loader is.

  caption_decoder  record -> CaptionDecoder: zstd-decompress the record with libzstd called through ctypes
                   from numba (dictionary pre-loaded as a ZSTD_DDict), draw one text with sampling's caption
                   draw, write sot + ids + eot padded to 77 int32 (or all texts, [max_texts, 77])
  crop_decoder     image -> SeededCropDecoder: decode + crop in one op, the box from
                   sampling.crop_box(seed, epoch, index)
  native_calls     the ctypes calls both run inside compiled code (CRC-32, setting a flag byte)

Both ops read (seed, epoch) from a small numpy array whose address the compiled code copies each batch, so
a new epoch needs no recompile. A damaged sample is flagged (-1 in its first token, or in the `bad`
array), never raised inside compiled code: the loader raises for it in Python with the sample's name.
Nothing here runs Python per sample.
"""
