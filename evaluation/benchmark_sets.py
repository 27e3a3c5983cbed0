"""CLIP_benchmark's other dataset names, read from local folders in the layouts CLIP_benchmark (or
torchvision) reads; nothing is downloaded. `root` is eval.py's --data-root, the folder holding each set.

  imagenetv2        root/ImageNetV2-matched-frequency/<0..999>/*.jpeg  (its release tar, extracted)
  imagenet_sketch   root/imagenet_sketch/<wnid>/* or root/sketch/<wnid>/*  (ImageNet-Sketch.zip)
  imagenet-a, -r    root/imagenet-a/<wnid>/*, root/imagenet-r/<wnid>/*  (200 ImageNet classes each)
  voc2007           root/voc2007/VOCdevkit/VOC2007/ (or root/VOCdevkit/VOC2007/): ImageSets/Main/
                    aeroplane_{train,test}.txt, Annotations/*.xml, JPEGImages/*.jpg; every object's box
                    cropped and labelled with its class, as CLIP_benchmark's voc2007
  renderedsst2      root/rendered-sst2/{train,valid,test}/{negative,positive}/*.png  (torchvision's)
  mscoco_captions   root/mscoco_captions/ (or root/mscoco, root/coco): val2014/ and coco_test_karpathy.json
                    (COCO captions format: images with id and file_name, annotations with image_id and
                    caption); retrieval only
  wds/<name>        root/wds_<name with "/" as "-"> (CLIP_benchmark's Hugging Face naming) or root/<name>:
                    CLIP_benchmark's webdataset layout, test/ (and train/) with nshards.txt and 0.tar,
                    1.tar, ...; a sample is an image (webp, png, jpg, jpeg) with its class id (cls) or, when
                    dataset_type.txt says retrieval, its captions (txt, one per line); classnames.txt and
                    zeroshot_classification_templates.txt ({c} for the class name) beside test/
  vtab/<name>       cifar10 cifar100 dtd flowers pets resisc45 read our torchvision layouts (the same test
                    images as VTAB's test split); the others (VTAB's own splits of tensorflow_datasets'
                    prepared data) are a DatasetError saying so.

Importing evaluation (the package) registers these names in evaluation/datasets.py.
"""
from __future__ import annotations

import json
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from evaluation.datasets import (ADAPTERS, DATA_DIR, PREFIXES, DatasetError, EvalSet, Split,
                                 _class_folders, _image_folder, _need, _scan_folders, load_class_names, load_templates,
                                 register)

# VTAB names whose test split is the one our torchvision-layout adapter reads.
VTAB_AS_OURS = ("cifar10", "cifar100", "dtd", "flowers", "pets")     # (resisc45: datasets.py's own alias)
# caltech101 and eurosat too: VTAB's splits of them differ from the ones our adapters draw.
VTAB_TFDS_ONLY = ("caltech101", "clevr_count_all", "clevr_closest_object_distance", "diabetic_retinopathy", "dmlab",
                  "dsprites_label_orientation", "dsprites_label_x_position", "eurosat",
                  "kitti_closest_vehicle_distance", "pcam", "smallnorb_label_azimuth", "smallnorb_label_elevation",
                  "svhn")
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
WDS_IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")


def _first_dir(name: str, candidates: list[Path], expected: str) -> Path:
    found = next((c for c in candidates if c.is_dir()), None)
    if found is None:
        raise DatasetError(f"{name}: expected {expected}; none of {', '.join(map(str, candidates))} exists "
                           "(nothing is downloaded)")
    return found


def _imagenet_names_for(name: str, wnids: list[str], d: Path) -> list[str]:
    """ImageNet's class names for these WordNet ids (its classes are the 1000 ids in sorted order)."""
    index = {w: i for i, w in enumerate(json.loads((DATA_DIR / "imagenet_wnids.json").read_text()))}
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise DatasetError(f"{name}: {d} has class folders that are not ImageNet WordNet ids: {unknown[:3]}")
    names = load_class_names("imagenet")
    return [names[index[w]] for w in wnids]


def _imagenet_variant(name: str, candidates: list[Path], expected: str) -> EvalSet:
    d = _first_dir(name, candidates, expected)
    folders = _class_folders(name, d)
    files, labels = _scan_folders(name, folders)
    classes = _imagenet_names_for(name, [f.name for f in folders], d)
    return EvalSet(name, classes, load_templates("imagenet"), {"test": Split(labels, files=files)}, source=str(d))


def _imagenetv2(root: Path) -> EvalSet:
    cands = [root / "ImageNetV2-matched-frequency", root / "imagenetv2" / "ImageNetV2-matched-frequency"]
    d = _first_dir("imagenetv2", cands, "ImageNetV2-matched-frequency/<class index 0..999>/*.jpeg")
    folders = _class_folders("imagenetv2", d)
    if not all(f.name.isdigit() and int(f.name) < 1000 for f in folders):
        raise DatasetError(f"imagenetv2: the class folders of {d} must be ImageNet class indices 0..999")
    files, _ = _scan_folders("imagenetv2", folders)
    labels = np.asarray([int(f.parent.name) for f in files], np.int64)
    return EvalSet("imagenetv2", load_class_names("imagenet"), load_templates("imagenet"),
                   {"test": Split(labels, files=files)}, source=str(d))


def _voc2007(root: Path) -> EvalSet:
    base = _first_dir("voc2007", [root / "voc2007" / "VOCdevkit" / "VOC2007", root / "VOCdevkit" / "VOC2007"],
                      "VOCdevkit/VOC2007 with ImageSets/Main, Annotations and JPEGImages")
    splits = {}
    for split in ("train", "test"):
        listing = base / "ImageSets" / "Main" / f"{VOC_CLASSES[0]}_{split}.txt"
        if not listing.exists():
            continue
        ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        labels, files, boxes = [], [], []
        for image_id in ids:
            xml = base / "Annotations" / f"{image_id}.xml"
            _need("voc2007", xml, base / "JPEGImages" / f"{image_id}.jpg", expected=f"every image {listing.name} lists")
            for obj in ET.parse(xml).findall("object"):
                box = obj.find("bndbox")
                labels.append(VOC_CLASSES.index(obj.findtext("name")))
                files.append(base / "JPEGImages" / f"{image_id}.jpg")
                boxes.append(tuple(int(float(box.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")))
        splits[split] = Split(np.asarray(labels, np.int64), files=files, boxes=boxes)
    if "test" not in splits:
        _need("voc2007", base / "ImageSets" / "Main" / f"{VOC_CLASSES[0]}_test.txt", expected="VOC 2007's test lists")
    return EvalSet("voc2007", VOC_CLASSES, load_templates("voc2007"), splits, source=str(base))


def _renderedsst2(root: Path) -> EvalSet:
    d = root / "rendered-sst2"
    subs = {s: sub for s, sub in (("train", "train"), ("val", "valid"), ("test", "test")) if (d / sub).is_dir()}
    if "test" not in subs:
        _need("renderedsst2", d / "test", expected=f"torchvision's Rendered SST2 layout in {d}")
    splits, classes = _image_folder("renderedsst2", d, subs)
    return EvalSet("renderedsst2", classes, load_templates("renderedsst2"), splits, source=str(d))


def _mscoco_captions(root: Path) -> EvalSet:
    d = _first_dir("mscoco_captions", [root / "mscoco_captions", root / "mscoco", root / "coco"],
                   "a folder with val2014/ and coco_test_karpathy.json")
    ann = d / "coco_test_karpathy.json"
    _need("mscoco_captions", ann, d / "val2014", expected=f"val2014/ and {ann.name} in {d}")
    coco = json.loads(ann.read_text())
    ids = sorted(im["id"] for im in coco["images"])          # in image-id order, as torchvision's CocoCaptions
    file_of = {im["id"]: d / "val2014" / im["file_name"] for im in coco["images"]}
    row = {image_id: n for n, image_id in enumerate(ids)}
    captions, owner = [], []
    for a in coco["annotations"]:
        captions.append(a["caption"])
        owner.append(row[a["image_id"]])
    order = np.argsort(owner, kind="stable")                # captions grouped by image, in annotation order
    files = [file_of[i] for i in ids]
    _need("mscoco_captions", *files, expected=f"every image {ann.name} names")
    return EvalSet("mscoco_captions", [], [], {"test": Split(np.zeros(len(ids), np.int64), files=files)},
                   captions=[captions[i] for i in order], caption_image=[owner[i] for i in order], source=str(d))


def _wds_split(name: str, d: Path, retrieval: bool) -> tuple[Split, list[list[str]]]:
    """One split of a webdataset folder: its images (as tar members) with class ids or captions."""
    nshards = d / "nshards.txt"
    _need(name, nshards, expected=f"CLIP_benchmark's webdataset layout ({d.name}/nshards.txt and 0.tar, ...)")
    shards = [d / f"{i}.tar" for i in range(int(nshards.read_text().strip()))]
    _need(name, *shards, expected=f"the {len(shards)} shards nshards.txt announces in {d}")
    members, labels, texts = [], [], []
    for shard in shards:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.isfile():
                    key, _, ext = m.name.partition(".")
                    samples.setdefault(key, {})[ext.lower()] = m
            for key, parts in samples.items():
                image = next((parts[e] for e in WDS_IMAGE_EXTS if e in parts), None)
                target = parts.get("txt" if retrieval else "cls")
                if image is None or target is None:
                    raise DatasetError(f"{name}: sample {key} of {shard} lacks an image ({', '.join(WDS_IMAGE_EXTS)}) "
                                       f"or its {'txt' if retrieval else 'cls'}")
                value = tar.extractfile(target).read().decode()
                members.append((shard, image.offset_data, image.size))
                if retrieval:
                    texts.append(value.splitlines())
                    labels.append(0)
                elif value.strip().lstrip("-").isdigit():
                    labels.append(int(value))
                else:
                    raise DatasetError(f"{name}: sample {key} of {shard}: cls {value!r} is not a class id")
    return Split(np.asarray(labels, np.int64), members=members), texts


def _wds(spec: str, root: Path) -> EvalSet:
    name = f"wds/{spec}"
    d = _first_dir(name, [root / f"wds_{spec.replace('/', '-')}", root / spec],
                   "CLIP_benchmark's webdataset layout (test/nshards.txt, test/0.tar, ...)")
    kind = (d / "dataset_type.txt").read_text().strip().lower() if (d / "dataset_type.txt").exists() else ""
    if kind not in ("", "classification", "retrieval"):
        raise DatasetError(f"{name}: dataset_type.txt says {kind!r}; eval.py reads classification and retrieval sets")
    retrieval = kind == "retrieval"
    splits = {s: _wds_split(name, d / s, retrieval) for s in ("train", "test") if s == "test" or (d / s).is_dir()}
    if retrieval:
        split, texts = splits["test"]
        owner = [i for i, t in enumerate(texts) for _ in t]
        return EvalSet(name, [], [], {"test": split}, captions=[c for t in texts for c in t], caption_image=owner,
                       source=str(d))
    _need(name, d / "classnames.txt", expected=f"classnames.txt (one class per line, in label order) in {d}")
    classes = [c.strip() for c in (d / "classnames.txt").read_text().splitlines() if c.strip()]
    tfile = d / "zeroshot_classification_templates.txt"
    templates = ([t.strip().replace("{c}", "{}") for t in tfile.read_text().splitlines() if t.strip()]
                 if tfile.exists() else load_templates("imagenet"))    # CLIP_benchmark's default: ImageNet's
    labels = np.concatenate([split.labels for split, _ in splits.values()])
    if labels.size and not 0 <= labels.min() <= labels.max() < len(classes):
        raise DatasetError(f"{name}: class ids {labels.min()}..{labels.max()} in its cls entries, but classnames.txt "
                           f"lists {len(classes)} classes")
    return EvalSet(name, classes, templates, {s: v[0] for s, v in splits.items()}, source=str(d))


def _tfds_only(vtab: str):
    def adapter(root: Path) -> EvalSet:
        raise DatasetError(
            f"vtab/{vtab}: CLIP_benchmark reads it with tensorflow_datasets (VTAB's splits of TFDS-prepared data), "
            f"which eval.py does not read; export it in CLIP_benchmark's webdataset layout and pass wds/vtab/{vtab} "
            "(see evaluation/benchmark_sets.py), or as folder:<dir> with <dir>/test/<class>/*")
    return adapter


register("imagenetv2", _imagenetv2)
register("imagenet_sketch", lambda root: _imagenet_variant(
    "imagenet_sketch", [root / "imagenet_sketch", root / "sketch"], "imagenet_sketch/<wnid>/* (or sketch/<wnid>/*)"))
register("imagenet_a", lambda root: _imagenet_variant("imagenet_a", [root / "imagenet-a"], "imagenet-a/<wnid>/*"),
         clip_benchmark="imagenet-a")
register("imagenet_r", lambda root: _imagenet_variant("imagenet_r", [root / "imagenet-r"], "imagenet-r/<wnid>/*"),
         clip_benchmark="imagenet-r")
register("voc2007", _voc2007)
register("renderedsst2", _renderedsst2)
register("mscoco_captions", _mscoco_captions)
for _name in VTAB_AS_OURS:
    register(_name, ADAPTERS[_name], aliases=(f"vtab/{_name}",))
for _vtab in VTAB_TFDS_ONLY:
    register(f"vtab/{_vtab}", _tfds_only(_vtab))
PREFIXES["wds/"] = _wds
