"""Image helpers for packing: decode any input image, resize so the short side is at most S, encode JPEG.

JPEG decoding uses simplejpeg (libjpeg-turbo), which can also decode straight to a reduced size (DCT
scaling), so large photos cost much less than a full decode + resize. Other formats go through Pillow.
"""
from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image

from common.io import write_atomic

JPEG_MAGIC = b"\xff\xd8"


class BrokenImage(ValueError):
    pass


def atomic_write_bytes(path: str, data: bytes) -> None:
    """tmp file in the same directory + fsync + rename (common/io.py): a reader never sees half a file."""
    write_atomic(path, data)


def encode_jpeg_pil(im: Image.Image, quality: int) -> bytes:
    return encode_jpeg(np.asarray(im.convert("RGB")), quality)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB",
                                  colorsubsampling="420")


def target_size(h: int, w: int, max_side: int | None) -> tuple[int, int]:
    """(h, w) with the short side at most max_side, aspect kept."""
    if not max_side or min(h, w) <= max_side:
        return h, w
    scale = max_side / min(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def decode_rgb(data: bytes, max_side: int | None = None) -> np.ndarray:
    """Any image -> uint8 RGB [H,W,3]; transparent images go onto white. Raises BrokenImage."""
    try:
        if data[:2] == JPEG_MAGIC:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            th, tw = target_size(h, w, max_side)
            # DCT scaling: decode to the smallest size still >= the target
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=th, min_width=tw, strict=True)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P", "PA") and ("transparency" in im.info or "A" in im.mode):
                im = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # every decoder has its own exception types
        raise BrokenImage(f"{type(e).__name__}: {e}") from None


def resize_short_side(rgb: np.ndarray, max_side: int | None) -> np.ndarray:
    h, w = rgb.shape[:2]
    th, tw = target_size(h, w, max_side)
    if (th, tw) == (h, w):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((tw, th), Image.Resampling.BICUBIC, reducing_gap=None))


def prepare_jpeg(data: bytes, max_side: int | None, quality: int, keep: bool = False) -> tuple[bytes, int, int]:
    """Input image bytes -> (JPEG bytes, height, width) ready to pack.

    keep=True passes baseline colour JPEGs through untouched (after checking they decode); anything else
    (PNG, WebP, grayscale or CMYK JPEG) is re-encoded, because both readers expect 3-channel JPEG.
    """
    if keep and data[:2] == JPEG_MAGIC:
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except Exception as e:
            raise BrokenImage(f"{type(e).__name__}: {e}") from None
        if colorspace == "YCbCr":
            decode_rgb(data, None)  # a truncated file must fail here, not in the training loop
            return data, h, w
    rgb = resize_short_side(decode_rgb(data, max_side), max_side)
    return encode_jpeg(rgb, quality), rgb.shape[0], rgb.shape[1]
