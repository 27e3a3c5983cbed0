"""Image and text features of a frozen model, and the on-disk cache of image features.

Every protocol starts from the same unnormalised image features of each split, so they are extracted once
per (checkpoint, set, split, subsample, image size) and kept as .npz; a cached file is used only when its
labels match the split's, so an edited set cannot silently reuse stale features. Images go through CLIP's
eval transform exactly as open_clip / CLIP_benchmark apply it, so our numbers are comparable to theirs.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.io import atomic_open
from evaluation.datasets import EvalSet, Split
from model.clip import IMAGE_MEAN, IMAGE_STD


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_identity(path: str) -> dict:
    """sha256 of the weights file; for a directory, of its listing (path, size, mtime of every file)."""
    p = Path(path)
    if p.is_file():
        return {"path": str(p.resolve()), "sha256": sha256_file(p)}
    from model.checkpoint import export_weights
    weights = export_weights(p)
    if weights is not None:
        return {"path": str(p.resolve()), "sha256": sha256_file(weights)}
    lines = sorted(f"{f.relative_to(p)}\t{f.stat().st_size}\t{f.stat().st_mtime_ns}"
                   for f in p.rglob("*") if f.is_file())
    return {"path": str(p.resolve()), "listing_sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def preprocess(image, size: int) -> torch.Tensor:
    """CLIP's eval transform, pixel for pixel as torchvision's Resize(size, BICUBIC) + CenterCrop(size)
    (open_clip's and CLIP_benchmark's): the short side becomes `size`, the long side int(size * long /
    short); the crop starts at int(round(excess / 2)). Then scale to [0, 1] and normalise."""
    from PIL import Image
    w, h = image.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGE_MEAN).view(3, 1, 1)) / torch.tensor(IMAGE_STD).view(3, 1, 1)


class _Images(torch.utils.data.Dataset):
    def __init__(self, split: Split, size: int):
        self.split, self.size = split, size

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return preprocess(self.split.image(i), self.size)


def subsample(split: Split, n: int, seed: int) -> tuple[Split, np.ndarray]:
    """A fixed subsample of n images (all when n <= 0) and the indices taken: quick CPU runs see the same
    images every time."""
    if n <= 0 or len(split) <= n:
        return split, np.arange(len(split))
    idx = np.sort(np.random.default_rng(seed).permutation(len(split))[:n])
    return split.take(idx), idx


def cache_file(cache_dir: str, ckpt_key: str, ds: EvalSet, split_name: str, split: Split, *,
               max_per_split: int, seed: int, size: int) -> Path | None:
    """Where a split's features are cached: one folder per checkpoint, one file per set, split and the
    settings that change the features. None when cache_dir is "" (no cache)."""
    if not cache_dir:
        return None
    key = hashlib.sha256(f"{ds.name}|{ds.source}|{split_name}|{len(split)}|{max_per_split}|{seed}|{size}"
                         .encode()).hexdigest()[:16]
    return Path(cache_dir) / ckpt_key / f"{ds.name.replace(':', '-').replace('/', '_')}-{split_name}-{key}.npz"


def _save_npz(path: Path, **arrays) -> None:
    with atomic_open(path, "wb") as f:   # a file object: np.savez would add ".npz" to a name
        np.savez(f, **arrays)


@torch.inference_mode()
def extract_features(model, split: Split, *, size: int, device: str, batch_size: int, workers: int,
                     cache: Path | None = None, desc: str = "features", progress: bool = True) -> np.ndarray:
    """Unnormalised image features [N, D] float32, read from / written to `cache` (.npz)."""
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            if np.array_equal(z["labels"], split.labels):
                return z["features"]
    loader = torch.utils.data.DataLoader(_Images(split, size), batch_size=batch_size, num_workers=workers,
                                         persistent_workers=False)
    out = []
    for x in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        out.append(model.encode_image(x.to(device)).float().cpu())
    feats = torch.cat(out).numpy() if out else np.zeros((0, model.embed_dim), np.float32)
    if cache is not None:
        _save_npz(cache, features=feats, labels=split.labels)
    return feats


@torch.inference_mode()
def encode_texts(model, texts: list[str], device: str, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings [N, D] on the CPU."""
    from model.tokenizer import get_tokenizer
    tok = get_tokenizer()
    out = [F.normalize(model.encode_text(tok(texts[i:i + batch_size]).to(device)).float(), dim=-1).cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out)
