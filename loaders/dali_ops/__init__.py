"""DALI pipeline operations, one module each (like FFCV's own transforms/), compiled once per
configuration and process and reused by every pipeline built later (DALI compiles a numba_function when
it is constructed); DALI is imported only when its loader is.

  sample  the per-sample work as one operator: the global index from the ".idx" member, each view's crop
          box from (seed, epoch, index, image size), the caption record decompressed, drawn and padded,
          and (when asked) the pack's record CRC-32s checked
  resize  the CPU resize of the decoded crops with OpenCV (through FFCV's library)
"""
