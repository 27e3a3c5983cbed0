"""Fit with the ecosystem: our export loads in open_clip (`local-dir:`), and eval.py's numbers in
CLIP_benchmark's format equal CLIP_benchmark's own on the same checkpoint and offline data.

open_clip and the `clip_benchmark` command run as installed in .venv (scripts/setup.sh: torchvision's
guard, scripts/torchvision_guard.py, and the numpy pin that clip-benchmark 1.6.2 needs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as E
from evaluation import features
from model.checkpoint import save_export
from model.clip import build_model
from model.tokenizer import get_tokenizer

def import_open_clip():
    return pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny CLIP with non-trivial weights everywhere, exported by save_export."""
    torch.manual_seed(0)
    model = build_model("tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    d = tmp_path_factory.mktemp("export")
    save_export(model, None, d)
    return d


def _odd_sizes(n: int):
    """Non-square sizes where (round, //) and torchvision's (int, int(round())) arithmetic disagree."""
    return [(37 + 11 * i % 53, 29 + 7 * i % 41) for i in range(n)]


def _photo(i: int, size) -> Image.Image:
    rng = np.random.default_rng(i)
    base = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)       # smooth-ish structure, then resized
    return Image.fromarray(base).resize(size, Image.BILINEAR)


def test_export_loads_in_open_clip_with_equal_embeddings(export):
    open_clip = import_open_clip()
    from model.checkpoint import load_checkpoint
    ours, _ = load_checkpoint(export)
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    again, preprocess_again = open_clip.create_model_from_pretrained(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    images = [_photo(i, s) for i, s in enumerate(_odd_sizes(12))]
    texts = ["a photo of a cat", "two dogs playing in the snow", "", "a red car on a street at night"]
    size = ours.image_size
    x_ours = torch.stack([features.preprocess(im, size) for im in images])
    x_theirs = torch.stack([preprocess(im) for im in images])
    assert torch.equal(x_ours, x_theirs)                          # pixel-identical preprocessing
    assert torch.equal(x_theirs, torch.stack([preprocess_again(im) for im in images]))
    assert torch.equal(tokenizer(texts), get_tokenizer()(texts))
    with torch.no_grad():
        for model in (theirs.eval(), again.eval()):
            torch.testing.assert_close(model.encode_image(x_theirs), ours.encode_image(x_ours), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.encode_text(tokenizer(texts)), ours.encode_text(get_tokenizer()(texts)),
                                       atol=1e-5, rtol=1e-5)
        assert float(theirs.logit_scale) == float(ours.logit_scale)


def test_open_clip_hub_directory_loads_back(export, tmp_path):
    """A directory holding only open_clip's two hub files loads with our code: ours (the weights file
    carries our metadata: an export) and one written elsewhere (a plain open_clip state dict)."""
    import shutil

    import safetensors.torch
    from model.checkpoint import load_checkpoint, to_open_clip_state_dict
    ours, _ = load_checkpoint(export)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copy(export / name, tmp_path / name)
    copied, info = load_checkpoint(tmp_path)
    assert info["format"] == "export"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(export / "open_clip_config.json", elsewhere)
    safetensors.torch.save_file({k: v.contiguous() for k, v in to_open_clip_state_dict(ours.state_dict()).items()},
                                str(elsewhere / "open_clip_model.safetensors"))
    hub, info = load_checkpoint(elsewhere)
    assert info["format"] == "open_clip_hub"
    for k, v in ours.state_dict().items():
        assert torch.equal(v, hub.state_dict()[k]) and torch.equal(v, copied.state_dict()[k]), k


# ---- CLIP_benchmark: names, results format, same numbers ------------------------------------------

def _write_idx(path: Path, data: np.ndarray) -> None:
    dims = np.asarray(data.shape, ">i4").tobytes()
    path.write_bytes(bytes([0, 0, 8, data.ndim]) + dims + data.astype(np.uint8).tobytes())


def _mnist_layout(root: Path) -> None:
    """scikit-learn's real 8x8 digits as 28x28 MNIST idx files in torchvision's layout (MNIST/raw)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    imgs = np.clip(d.images * (255 / 16), 0, 255).astype(np.uint8).repeat(3, 1).repeat(3, 2)   # 24x24
    imgs = np.pad(imgs, ((0, 0), (2, 2), (2, 2)))                                              # 28x28
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, sl in (("train", slice(0, 300)), ("t10k", slice(300, 600))):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", imgs[sl])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", d.target[sl])


def _flickr_layout(root: Path, n: int = 40) -> None:
    """Real emoji pictures with their names, two captions each, at non-square sizes, in CLIP_benchmark's
    Flickr8k layout (images + flickr8k_test_karpathy.txt)."""
    from packing.builders import _emoji_image, emoji_records
    records = emoji_records()[0][::97][:n]
    d = root / "flickr8k"
    d.mkdir(parents=True)
    lines = ["image,caption"]
    for r, size in zip(records, _odd_sizes(n)):
        _emoji_image(r["src"], 64).convert("RGB").resize(size, Image.BICUBIC).save(d / f"{r['key']}.jpg", quality=95)
        lines += [f"{r['key']}.jpg,{r['caption']}", f"{r['key']}.jpg,an emoji of {r['category']}: {r['caption']}"]
    (d / "flickr8k_test_karpathy.txt").write_text("\n".join(lines) + "\n")


RECALL_K = ["1", "3", "5"]  # not the defaults of either side: --recall_k reaches both


def _clip_benchmark(export: Path, dataset: str, root: Path, out: Path) -> dict:
    pytest.importorskip("clip_benchmark")
    command = [str(Path(sys.executable).with_name("clip_benchmark")), "eval", "--dataset", dataset,
               "--dataset_root", str(root), "--model", f"local-dir:{export}", "--pretrained", "", "--no_amp",
               "--batch_size", "64", "--num_workers", "0", "--recall_k", *RECALL_K,
               "--output", str(out / "{dataset}_{task}.json")]
    proc = subprocess.run(command, cwd=out, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = out.glob(f"{dataset}_*.json")
    return json.loads(path.read_text())


@pytest.mark.timeout(400)
@pytest.mark.slow
def test_clip_benchmark_format_and_numbers_equal_its_own(export, tmp_path):
    data = tmp_path / "data"
    _mnist_layout(data)
    _flickr_layout(data)
    theirs = {}
    for dataset, root in (("mnist", data), ("flickr8k", data / "flickr8k")):
        out = tmp_path / f"cb-{dataset}"
        out.mkdir()
        theirs[dataset] = _clip_benchmark(export, dataset, root, out)
    ours_dir = tmp_path / "ours"
    assert E.main(["--checkpoint", str(export), "--datasets", "MNIST,flickr8k", "--data-root", str(data),
                   "--protocols", "zeroshot,retrieval", "--format", "clip_benchmark", "--out", str(ours_dir),
                   "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--recall_k", *RECALL_K]) == 0
    files = sorted(ours_dir.glob("*.json"))
    assert [f.name.split("_")[0] for f in files] == ["flickr8k", "mnist"]
    ours = {json.loads(f.read_text())["dataset"]: json.loads(f.read_text()) for f in files}
    assert ours["mnist"]["task"] == theirs["mnist"]["task"] == "zeroshot_classification"
    assert ours["flickr8k"]["task"] == theirs["flickr8k"]["task"] == "zeroshot_retrieval"
    for dataset in ("mnist", "flickr8k"):
        assert set(ours[dataset]) >= {"dataset", "model", "task", "metrics"}
        mine, ref = ours[dataset]["metrics"], theirs[dataset]["metrics"]
        assert set(ref) <= set(mine), (ref, mine)
        for key, value in ref.items():
            assert mine[key] == pytest.approx(value, abs=1e-6), (dataset, key, mine[key], value)
    # not all trivially 0 or 1: the comparison has something to compare
    assert 0 < theirs["mnist"]["metrics"]["acc5"] < 1
    assert 0 < theirs["flickr8k"]["metrics"]["image_retrieval_recall@5"] < 1
    asked = {f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in RECALL_K}
    assert set(theirs["flickr8k"]["metrics"]) == set(ours["flickr8k"]["metrics"]) == asked


def test_dataset_names_accept_clip_benchmark_and_both_spellings():
    from evaluation.datasets import DatasetError, canonical_name
    assert canonical_name("fashion-mnist") == canonical_name("fashion_mnist") == "fashion_mnist"
    assert canonical_name("imagenet1k") == canonical_name("imagenet") == "imagenet"
    assert canonical_name("fgvc_aircraft") == canonical_name("fgvc-aircraft") == "aircraft"
    assert canonical_name("vtab/resisc45") == "resisc45"
    assert canonical_name("Flickr30k") == "flickr30k"
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet-x'.*hyphens and underscores"):
        canonical_name("imagenet-x")


def test_fashion_mnist_hyphen_spelling_runs(export, tmp_path):
    from evaluation.datasets import FASHION_MNIST_SYSTEM
    if not FASHION_MNIST_SYSTEM.is_dir():
        pytest.skip("Debian dataset-fashion-mnist is not installed")
    assert E.main(["--checkpoint", str(export), "--datasets", "fashion-mnist", "--protocols", "zeroshot",
                   "--max-per-split", "100", "--workers", "0", "--cache-dir", str(tmp_path / "c"),
                   "--out", str(tmp_path / "r.json")]) == 0
    assert "fashion_mnist" in json.loads((tmp_path / "r.json").read_text())["results"]
