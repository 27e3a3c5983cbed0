"""Image augmentation of the paper, shared by the loaders.

- RandomResizedCrop(224, scale=(0.5, 1), ratio=(3/4, 4/3)) (LaCLIP's CLIP recipe): the box is
  loaders.sampling.crop_box(seed, epoch, sample index, ...), so every loader crops a sample the same way;
  the crop itself runs on the decoded uint8 HWC image (torch loader) or inside FFCV/DALI;
- CLIP mean/std normalisation, done once per batch on the uint8 tensor (vectorised, all loaders), on the
  CPU in the loader or on the GPU after a uint8 copy (the trainer on a GPU);
- SLIP's two SimCLR views: RandomResizedCrop(scale 0.08-1) in the loader, then flip, colour jitter
  (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with p=0.2 and Gaussian blur (sigma 0.1-2) with p=0.5,
  applied batched in torch here, with each sample's parameters drawn from (seed, epoch, index, view).
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
# Constants are made once on the CPU and moved to the images' device where they are used (a CPU tensor
# meeting CUDA images raises); values computed on the CPU stay the same whatever the device.
_MEAN_255 = torch.tensor(CLIP_MEAN, dtype=torch.float32) * 255
_STD_255 = torch.tensor(CLIP_STD, dtype=torch.float32) * 255
_MEAN, _STD = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB = torch.linalg.inv(_YIQ)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W,3] (or [B,3,H,W]) -> float32 [B,3,H,W] with CLIP mean/std, on the images' device: on
    a GPU, copy the uint8 batch over (4x fewer bytes than float32) and normalise it there."""
    if images.device.type == "cpu" and images.dtype == torch.uint8 and images.shape[-1] == 3 \
            and images.is_contiguous():
        b, h, w, _ = images.shape
        out = np.empty((b, 3, h, w), dtype=np.float32)
        return torch.from_numpy(_normalize_hwc(images.numpy(), out, _SCALE, _SHIFT))
    if images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    mean = _MEAN_255.to(images.device).view(1, 3, 1, 1)
    std = _STD_255.to(images.device).view(1, 3, 1, 1)
    return ((images.float() - mean) / std).contiguous()


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * a + (1 - factor) * b).clamp(0, 1)


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    # Rotate hue in YIQ space: cheap, batched and close to torchvision's HSV hue shift for |h| <= 0.1.
    yiq, rgb = _YIQ.to(x.device), _RGB.to(x.device)
    theta = shift.view(-1) * 2 * math.pi
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(len(theta), 3, 3, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = rgb @ rot @ yiq  # [B,3,3]
    return torch.einsum("bij,bjhw->bihw", m, x).clamp(0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int = 23) -> torch.Tensor:
    half = kernel // 2
    t = torch.arange(-half, half + 1, dtype=torch.float32, device=x.device)
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


SIMCLR_DRAWS = 12  # uniforms per sample: flip, jitter gate, 4 jitter factors, grayscale, blur gate, sigma


def simclr_view(crops: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """SLIP/SimCLR colour part of a view, drawn from a torch generator (order-dependent: prefer
    simclr_view_seeded, whose draws are per sample)."""
    return simclr_colour(crops, torch.rand(len(crops), SIMCLR_DRAWS, generator=generator, dtype=torch.float64))


def simclr_view_seeded(crops: torch.Tensor, seed: int, epoch: int, index, view: int) -> torch.Tensor:
    """SimCLR colour part with sample i's parameters a function of (seed, epoch, index[i], view) only:
    the same for any batch size, worker count or resume point."""
    from loaders.sampling import SIMCLR_SALT, sample_uniforms

    index = np.ascontiguousarray(np.asarray(index, dtype=np.int64).reshape(-1))
    return simclr_colour(crops, torch.from_numpy(sample_uniforms(seed, epoch, index, SIMCLR_SALT, view,
                                                                 SIMCLR_DRAWS)))


def simclr_colour(crops: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """uint8 crops [B,H,W,3] -> normalised float [B,3,H,W]: flip, colour jitter (p=0.8), grayscale (p=0.2),
    Gaussian blur (p=0.5), with sample b's random parameters taken from the uniforms draws[b] in [0, 1).
    The draws may come from the CPU (drawn there, so they are the same numbers on any device): they
    move to the crops' device, where every other tensor here is made too."""
    x = crops.permute(0, 3, 1, 2).float() / 255
    b = x.shape[0]
    u = draws.to(x.device, torch.float32)

    def between(lo, hi, k):
        return (lo + (hi - lo) * u[:, k]).view(b, 1, 1, 1)

    def gate(p, k):
        return (u[:, k] < p).view(b, 1, 1, 1)

    x = torch.where(gate(0.5, 0), x.flip(-1), x)
    y = _blend(x, torch.zeros_like(x), between(0.6, 1.4, 2))  # brightness
    y = _blend(y, _gray(y).mean((2, 3), keepdim=True), between(0.6, 1.4, 3))  # contrast
    y = _blend(y, _gray(y), between(0.6, 1.4, 4))  # saturation
    y = _hue_shift(y, between(-0.1, 0.1, 5).view(b))
    x = torch.where(gate(0.8, 1), y, x)
    x = torch.where(gate(0.2, 6), _gray(x).expand_as(x), x)
    x = torch.where(gate(0.5, 7), _gaussian_blur(x, between(0.1, 2.0, 8).view(b)), x)
    mean, std = _MEAN.to(x.device).view(1, 3, 1, 1), _STD.to(x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
