"""The resize op: a CPU resize of decoded images to the output size with OpenCV (through FFCV's library),
as a compiled DALI operator, where DALI's own CPU resize is several times slower."""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import os

_COMPILED: dict = {}   # size -> operator, compiled once per process


def resize_op(size: int):
    """A DALI NumbaFunction resizing a uint8 HWC image to size x size with OpenCV (through FFCV's library):
    DALI's own CPU resize costs about 1 ms per 224 px image here, several times its ROI decode. None when
    FFCV is not installed (then fn.resize serves)."""
    if size not in _COMPILED:
        _COMPILED[size] = _compile_resize(size)
    return _COMPILED[size]


def _compile_resize(size: int):
    from nvidia.dali import types
    from nvidia.dali.plugin.numba.experimental import NumbaFunction

    resize = _opencv_resize()
    if resize is None:
        return None

    def setup(outs, ins):
        for s in range(len(outs[0])):
            outs[0][s][0], outs[0][s][1], outs[0][s][2] = size, size, 3

    def run(out, image):
        resize(0, image.ctypes.data, image.shape[0], image.shape[1], 0, image.shape[0], 0, image.shape[1],
               out.ctypes.data, size, size)

    return NumbaFunction(run_fn=run, setup_fn=setup, out_types=[types.UINT8], in_types=[types.UINT8],
                         outs_ndim=[3], ins_ndim=[3])


def _opencv_resize():
    """FFCV's compiled resize (OpenCV INTER_AREA, the FFCV loader's filter) as a ctypes function, found
    without importing ffcv; None when FFCV is not installed."""
    spec = importlib.util.find_spec("ffcv")
    found = glob.glob(os.path.join(os.path.dirname(spec.origin), "_libffcv*.so")) if spec and spec.origin else []
    if not found:
        return None
    fn = ctypes.CDLL(found[0]).resize
    fn.argtypes, fn.restype = [ctypes.c_int64] * 11, None
    return fn
