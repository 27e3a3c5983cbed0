"""CLIP_benchmark's other dataset names (evaluation/benchmark_sets.py) on tiny real sets written here in the
layouts CLIP_benchmark and torchvision read, and --recall_k.

Where CLIP_benchmark itself runs on such a tiny set (renderedsst2, voc2007), its numbers are the reference.
Elsewhere a new reader is checked against one already checked against CLIP_benchmark: the same images and
captions written as a webdataset and as an image folder, as COCO and as Flickr8k, must give equal results."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import eval as E
from evaluation.datasets import DATA_DIR, DatasetError, canonical_name, load_class_names, open_eval_set
from tests import test_ecosystem
from tests.test_ecosystem import _clip_benchmark, _odd_sizes, _photo

export = test_ecosystem.export          # the fixture: a tiny CLIP with non-trivial weights, exported

CLASSES = ["cat", "dog", "car"]
CAPTIONS = [["a cat asleep on a sofa", "a small grey cat"], ["a dog in the snow", "two dogs"],
            ["a red car at night", "a car on a street"], ["a cat and a dog", "pets"]]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    return [_photo(seed + i, size) for i, size in enumerate(_odd_sizes(n))]


def _eval(export_dir: Path, tmp_path: Path, dataset: str, root: Path, *extra: str) -> dict:
    out = tmp_path / f"{dataset.replace('/', '_').replace(':', '_')}.json"
    assert E.main(["--checkpoint", str(export_dir), "--datasets", dataset, "--data-root", str(root),
                   "--workers", "0", "--cache-dir", "", "--out", str(out), *extra]) == 0
    (result,) = json.loads(out.read_text())["results"].values()
    return result


def test_clip_benchmark_names_resolve():
    import clip_benchmark.datasets.builder as cb
    listed = set(cb.dataset_collection["vtab"]) | {n for n in cb.dataset_collection["vtab+"] if n.startswith("vtab/")}
    asked = {"mscoco_captions", "imagenetv2", "imagenet-a", "imagenet-r", "imagenet_sketch", "voc2007", "renderedsst2",
             "wds/vtab/cifar10"}
    for name in listed | asked:
        canonical_name(name)                          # raises DatasetError when unknown
    assert canonical_name("vtab/cifar10") == "cifar10" and canonical_name("Imagenet-A") == "imagenet_a"
    with pytest.raises(DatasetError, match="vtab/svhn: CLIP_benchmark reads it with tensorflow_datasets"):
        open_eval_set("vtab/svhn", "/nonexistent")


def test_imagenet_variants_name_classes_by_wordnet_id(export, tmp_path):
    wnids = json.loads((DATA_DIR / "imagenet_wnids.json").read_text())
    picked = [7, 250, 980]                                         # three ImageNet classes, by index
    for i, (idx, im) in enumerate(zip(picked * 2, _images(6))):
        d = tmp_path / "imagenet-r" / wnids[idx]
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i}.jpg", quality=95)
    ds = open_eval_set("imagenet-r", tmp_path)
    names = load_class_names("imagenet")
    assert ds.class_names == [names[i] for i in picked] and len(ds.splits["test"]) == 6
    out = tmp_path / "cb"
    assert E.main(["--checkpoint", str(export), "--datasets", "imagenet-r", "--data-root", str(tmp_path),
                   "--protocols", "zeroshot", "--format", "clip_benchmark", "--out", str(out), "--workers", "0",
                   "--cache-dir", ""]) == 0
    (written,) = out.glob("*.json")
    assert json.loads(written.read_text())["dataset"] == "imagenet-r" and written.name.startswith("imagenet-r_")
    # ImageNetV2's folders are class indices
    for i, im in enumerate(_images(3, seed=10)):
        d = tmp_path / "ImageNetV2-matched-frequency" / str(picked[i])
        d.mkdir(parents=True)
        im.save(d / f"{i}.jpeg", quality=95)
    v2 = open_eval_set("imagenetv2", tmp_path)
    assert len(v2.class_names) == 1000 and sorted(v2.splits["test"].labels.tolist()) == picked


def _renderedsst2_layout(root: Path) -> None:
    for i, im in enumerate(_images(8)):
        d = root / "rendered-sst2" / "test" / ("negative", "positive")[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i}.png")


def _voc_layout(root: Path) -> None:
    """Three VOC 2007 test images with two or three boxed objects each (CLIP_benchmark crops each box)."""
    base = root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True)
    objects = [[("cat", (3, 4, 40, 30)), ("dog", (10, 2, 33, 25))],
               [("car", (0, 0, 20, 20)), ("person", (5, 6, 39, 28)), ("bird", (1, 1, 12, 9))],
               [("aeroplane", (2, 3, 30, 29)), ("cat", (8, 8, 36, 27))]]
    ids = [f"{i + 1:06d}" for i in range(len(objects))]                    # 000001.jpg: CLIP_benchmark's check
    for image_id, objs, im in zip(ids, objects, _images(3, seed=20)):
        im.resize((44, 32)).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
        xml = "".join(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0"
                      f"</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}"
                      "</ymax></bndbox></object>" for name, b in objs)
        (base / "Annotations" / f"{image_id}.xml").write_text(f"<annotation><filename>{image_id}.jpg</filename>"
                                                             f"{xml}</annotation>")
    (base / "ImageSets" / "Main" / "aeroplane_test.txt").write_text("".join(f"{i} -1\n" for i in ids))


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_renderedsst2_and_voc2007_equal_clip_benchmark(export, tmp_path):
    data = tmp_path / "data"
    _renderedsst2_layout(data)
    _voc_layout(data / "voc")
    theirs = {}
    for dataset, root in (("renderedsst2", data), ("voc2007", data / "voc")):
        out = tmp_path / f"cb-{dataset}"
        out.mkdir()
        theirs[dataset] = _clip_benchmark(export, dataset, root, out)["metrics"]
    assert open_eval_set("voc2007", data / "voc").splits["test"].labels.tolist() == [7, 11, 6, 14, 2, 0, 7]
    for dataset in ("renderedsst2", "voc2007"):
        out = tmp_path / f"ours-{dataset}"
        root = data / "voc" if dataset == "voc2007" else data
        assert E.main(["--checkpoint", str(export), "--datasets", dataset, "--data-root", str(root), "--protocols",
                       "zeroshot", "--format", "clip_benchmark", "--out", str(out), "--workers", "0",
                       "--cache-dir", ""]) == 0
        (written,) = out.glob("*.json")
        mine = json.loads(written.read_text())["metrics"]
        for key, value in theirs[dataset].items():    # 1e-6: float32 features on both sides, as test_ecosystem
            if value == value:                        # acc5 is NaN on both sides under 5 classes
                assert mine[key] == pytest.approx(value, abs=1e-6), (dataset, key, mine[key], value)
    assert 0 < theirs["voc2007"]["acc5"] < 1


def _tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample.pop("__key__")
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_wds_classification_reads_what_the_folder_reads(export, tmp_path):
    """CLIP_benchmark's webdataset layout (two shards) against the same images as folder:<dir>."""
    images = _images(9)
    labels = [i % 3 for i in range(9)]
    wds = tmp_path / "wds_tiny-pets"                   # wds/tiny/pets, as CLIP_benchmark's HF names
    (wds / "test").mkdir(parents=True)
    samples = [{"__key__": f"s{i:07d}", "png": _png(im), "cls": str(y).encode()} for i, (im, y)
               in enumerate(zip(images, labels))]
    _tar(wds / "test" / "0.tar", samples[:5])
    _tar(wds / "test" / "1.tar", samples[5:])
    (wds / "test" / "nshards.txt").write_text("2\n")
    (wds / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    templates = json.loads((DATA_DIR / "templates.json").read_text())["captions"]  # what folder: uses
    (wds / "zeroshot_classification_templates.txt").write_text("\n".join(t.replace("{}", "{c}") for t in templates))
    folder = tmp_path / "folder"
    for i, (im, y) in enumerate(zip(images, labels)):
        (folder / "test" / CLASSES[y]).mkdir(parents=True, exist_ok=True)
        im.save(folder / "test" / CLASSES[y] / f"{i}.png")
    wds_result = _eval(export, tmp_path, "wds/tiny/pets", tmp_path, "--protocols", "zeroshot")
    folder_result = _eval(export, tmp_path, f"folder:{folder}", tmp_path, "--protocols", "zeroshot")
    assert wds_result["n_test"] == 9 and wds_result["zeroshot"] == folder_result["zeroshot"]
    (wds / "classnames.txt").write_text("cat\ndog\n")
    with pytest.raises(DatasetError, match=r"wds/tiny/pets: class ids 0..2 in its cls entries, but classnames.txt "
                                           r"lists 2 classes"):
        open_eval_set("wds/tiny/pets", tmp_path)


def _flickr_and_coco(root: Path) -> None:
    """The same four images and their captions in CLIP_benchmark's Flickr8k and COCO layouts."""
    flickr, coco = root / "flickr8k", root / "mscoco_captions"
    (coco / "val2014").mkdir(parents=True)
    flickr.mkdir()
    lines, coco_images, coco_anns = ["image,caption"], [], []
    for i, im in enumerate(_images(len(CAPTIONS), seed=30)):
        name = f"COCO_val2014_{i:012d}.jpg"
        im.save(flickr / name, quality=95)
        im.save(coco / "val2014" / name, quality=95)
        coco_images.append({"id": 100 + i, "file_name": name})
        for caption in CAPTIONS[i]:
            lines.append(f"{name},{caption}")
            coco_anns.append({"id": len(coco_anns), "image_id": 100 + i, "caption": caption})
    (flickr / "flickr8k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    (coco / "coco_test_karpathy.json").write_text(json.dumps({"images": coco_images, "annotations": coco_anns}))


def test_retrieval_sets_and_recall_k(export, tmp_path):
    """mscoco_captions and a retrieval webdataset give Flickr8k's numbers on the same images and captions,
    and --recall_k (space- or comma-separated) sets exactly the K reported."""
    _flickr_and_coco(tmp_path)
    wds = tmp_path / "wds_tiny-captions"
    (wds / "test").mkdir(parents=True)
    (wds / "dataset_type.txt").write_text("retrieval\n")
    flickr_dir = tmp_path / "flickr8k"
    _tar(wds / "test" / "0.tar", [{"__key__": f"s{i:07d}", "jpg": (flickr_dir / f"COCO_val2014_{i:012d}.jpg")
                                   .read_bytes(), "txt": "\n".join(c).encode()} for i, c in enumerate(CAPTIONS)])
    (wds / "test" / "nshards.txt").write_text("1")
    flickr = _eval(export, tmp_path, "flickr8k", tmp_path, "--protocols", "retrieval", "--recall_k", "1", "2", "4")
    coco = _eval(export, tmp_path, "mscoco_captions", tmp_path, "--protocols", "retrieval", "--recall_k", "1,2,4")
    tar = _eval(export, tmp_path, "wds/tiny/captions", tmp_path, "--protocols", "retrieval", "--recall_k", "1,2", "4")
    assert set(flickr["retrieval"]) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 2, 4)}
    assert coco["retrieval"] == flickr["retrieval"] == tar["retrieval"]
    assert flickr["retrieval"]["text_to_image_R@4"] == 100                 # 4 images: every caption's is in the top 4
    assert 0 < flickr["retrieval"]["text_to_image_R@1"] < 100


def test_recall_k_reaches_the_clip_benchmark_files_and_table(export, tmp_path):
    _flickr_and_coco(tmp_path)
    out = tmp_path / "cb"
    argv = ["--checkpoint", str(export), "--datasets", "mscoco_captions", "--data-root", str(tmp_path), "--protocols",
            "retrieval", "--format", "clip_benchmark", "--out", str(out), "--workers", "0", "--cache-dir", "",
            "--recall_k", "3"]
    proc = subprocess.run([sys.executable, "eval.py", *argv], cwd=Path(E.__file__).parent, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "image_to_text_R@3" in proc.stdout and "R@5" not in proc.stdout          # the printed table
    (written,) = out.glob("*.json")
    report = json.loads(written.read_text())
    assert report["dataset"] == "mscoco_captions" and report["task"] == "zeroshot_retrieval"
    assert set(report["metrics"]) == {"image_retrieval_recall@3", "text_retrieval_recall@3"}
