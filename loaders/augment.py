"""Image augmentation of the paper, shared by the loaders.

- RandomResizedCrop(224, scale=(0.5, 1), ratio=(3/4, 4/3)) (LaCLIP's CLIP recipe), computed per sample on
  the decoded uint8 HWC image (torch loader) or inside FFCV/DALI by their own crop operators with the
  same parameters;
- CLIP mean/std normalisation, done once per batch on the uint8 tensor (vectorised, all loaders);
- SLIP's two SimCLR views: RandomResizedCrop(scale 0.08-1) in the loader, then flip, colour jitter
  (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with p=0.2 and Gaussian blur (sigma 0.1-2) with p=0.5,
  applied batched in torch here.
"""
from __future__ import annotations

import math

import cv2
import numba
import numpy as np
import torch

from model.clip import IMAGE_MEAN as CLIP_MEAN, IMAGE_STD as CLIP_STD  # the model's normalisation
CROP_SCALE = (0.5, 1.0)
SIMCLR_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

cv2.setNumThreads(1)  # one thread per loader worker; the workers are the parallelism


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale=CROP_SCALE, ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w), center crop after 10 misses."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop a uint8 HWC image to box and resize to size x size (area filter when shrinking)."""
    top, left, h, w = box
    patch = image[top:top + h, left:left + w]
    interp = cv2.INTER_AREA if h > size and w > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interp)


@numba.njit(fastmath=True, nogil=True, cache=True)
def _normalize_hwc(src, out, scale, shift):
    # One pass, HWC uint8 -> CHW float32: 7x faster on CPU than torch's float/sub/div/contiguous chain.
    for b in range(src.shape[0]):
        for c in range(3):
            s, t = scale[c], shift[c]
            for h in range(src.shape[1]):
                for w in range(src.shape[2]):
                    out[b, c, h, w] = src[b, h, w, c] * s + t
    return out


_SCALE = (1 / (np.array(CLIP_STD) * 255)).astype(np.float32)
_SHIFT = (-np.array(CLIP_MEAN) / np.array(CLIP_STD)).astype(np.float32)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W,3] (or [B,3,H,W]) -> float32 [B,3,H,W] with CLIP mean/std, on CPU or GPU."""
    if images.device.type == "cpu" and images.dtype == torch.uint8 and images.shape[-1] == 3 \
            and images.is_contiguous():
        b, h, w, _ = images.shape
        out = np.empty((b, 3, h, w), dtype=np.float32)
        return torch.from_numpy(_normalize_hwc(images.numpy(), out, _SCALE, _SHIFT))
    if images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return ((images.float() - mean) / std).contiguous()


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * a + (1 - factor) * b).clamp(0, 1)


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    # Rotate hue in YIQ space: cheap, batched and close to torchvision's HSV hue shift for |h| <= 0.1.
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rgb = torch.linalg.inv(yiq)
    theta = shift.view(-1) * 2 * math.pi
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(len(theta), 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = rgb @ rot @ yiq  # [B,3,3]
    return torch.einsum("bij,bjhw->bihw", m, x).clamp(0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int = 23) -> torch.Tensor:
    half = kernel // 2
    t = torch.arange(-half, half + 1, dtype=torch.float32)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    k = k / k.sum(1, keepdim=True)  # [B,K]
    b, ch, h, w = x.shape
    y = x.reshape(1, b * ch, h, w)
    kk = k.repeat_interleave(ch, 0)
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(y, (half, half, 0, 0), mode="reflect"),
                                   kk.view(b * ch, 1, 1, kernel), groups=b * ch)
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(y, (0, 0, half, half), mode="reflect"),
                                   kk.view(b * ch, 1, kernel, 1), groups=b * ch)
    return y.view(b, ch, h, w)


def simclr_view(crops: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """SLIP/SimCLR colour part of a view, batched: uint8 crops [B,H,W,3] -> normalised float [B,3,H,W]."""
    x = crops.permute(0, 3, 1, 2).float() / 255
    b = x.shape[0]

    def u(lo, hi, shape=(b, 1, 1, 1)):
        return lo + (hi - lo) * torch.rand(shape, generator=generator)

    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    jitter = (torch.rand(b, generator=generator) < 0.8).view(b, 1, 1, 1)
    y = _blend(x, torch.zeros_like(x), u(0.6, 1.4))  # brightness
    y = _blend(y, _gray(y).mean((2, 3), keepdim=True), u(0.6, 1.4))  # contrast
    y = _blend(y, _gray(y), u(0.6, 1.4))  # saturation
    y = _hue_shift(y, u(-0.1, 0.1, (b,)))
    x = torch.where(jitter, y, x)
    gray = (torch.rand(b, generator=generator) < 0.2).view(b, 1, 1, 1)
    x = torch.where(gray, _gray(x).expand_as(x), x)
    blur = (torch.rand(b, generator=generator) < 0.5).view(b, 1, 1, 1)
    x = torch.where(blur, _gaussian_blur(x, u(0.1, 2.0, (b,))), x)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
