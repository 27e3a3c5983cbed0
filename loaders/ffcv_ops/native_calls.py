"""The ctypes calls the FFCV ops make inside compiled code, each wrapped in a compiled function: called
directly inside FFCV's parallel (prange) loop, numba's parfor lowering fails on them (AssertionError on
the return type)."""
from __future__ import annotations

import numba
import numpy as np

from loaders.native import crc32, memcpy


@numba.njit(nogil=True)
def crc32_of(data):
    """CRC-32 of a uint8 array (zlib's)."""
    return crc32(0, data.ctypes.data, data.size)


@numba.njit(nogil=True)
def set_flag(address):
    """Set the byte at `address` to 1 (a sample's flag in the loader's `bad` array)."""
    one = np.ones(1, dtype=np.uint8)
    memcpy(address, one.ctypes.data, 1)
