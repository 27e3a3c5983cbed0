"""C functions the compiled FFCV and DALI pipelines call per sample, and the record padding they share.

libzstd (through ctypes, so numba code can call it without the GIL), zlib's crc32 and memcpy, bound once
here; loaders/ffcv_ops/ and loaders/dali_ops/ compile their own numba dispatchers of the pure-Python
helpers below (a dispatcher shared between the two pipelines once hung an FFCV epoch).
"""
from __future__ import annotations

import ctypes

import numpy as np

CONTEXT_LENGTH = 77
RECORD_CAPACITY = 1 << 16  # bytes of one decompressed record; far above (M+1) x 75 tokens x 2 bytes
MAX_TEXTS = RECORD_CAPACITY // 2  # more texts than uint16 words cannot fit a record


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
create_dctx, free_dctx = _ZSTD.ZSTD_createDCtx, _ZSTD.ZSTD_freeDCtx
decompress, is_error = _ZSTD.ZSTD_decompressDCtx, _ZSTD.ZSTD_isError
set_param, ref_ddict = _ZSTD.ZSTD_DCtx_setParameter, _ZSTD.ZSTD_DCtx_refDDict
# The store writes frames without the 4-byte magic (zstandard.FORMAT_ZSTD1_MAGICLESS): tell the context.
ZSTD_D_FORMAT, ZSTD_F_MAGICLESS = 1000, 1  # ZSTD_d_experimentalParam1, ZSTD_f_zstd1_magicless
crc32 = ctypes.CDLL("libz.so.1").crc32  # zlib's CRC-32, callable from compiled code (= Python's zlib.crc32)
crc32.restype, crc32.argtypes = ctypes.c_ulong, [ctypes.c_ulong, ctypes.c_void_p, ctypes.c_uint]
memcpy = ctypes.CDLL(None).memcpy
memcpy.restype, memcpy.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_DDICTS: dict[bytes, tuple[int, np.ndarray]] = {}  # one DDict per dictionary, alive for the process


def ddict(dictionary: bytes | None) -> int:
    """Address of a ZSTD_DDict of the caption dictionary (0: none), created once per process."""
    if not dictionary:
        return 0
    if dictionary not in _DDICTS:
        buf = np.frombuffer(dictionary, dtype=np.uint8).copy()
        _DDICTS[dictionary] = (_ZSTD.ZSTD_createDDict(buf.ctypes.data, buf.size), buf)
    return _DDICTS[dictionary][0]


def pad_text(out, buf, start, length, sot, eot):
    """sot + uint16 little-endian ids (cut to 75) + eot into a zeroed int32 row of 77 (compiled by each
    pipeline's ops module)."""
    n = min(length, CONTEXT_LENGTH - 2)
    out[0] = sot
    for j in range(n):
        out[1 + j] = np.int32(buf[start + 2 * j]) | (np.int32(buf[start + 2 * j + 1]) << 8)
    out[1 + n] = eot
