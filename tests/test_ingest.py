"""Ingest readers and the offline dataset builders, on real images (openclipart PNGs, Noto emoji)."""
import csv
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from common.text import normalize_words
from packing import builders
from packing.builders import open_source
from packing.ingest import IngestError, IngestReport, iter_image_folder, iter_laclip_csv, iter_webdataset


@pytest.fixture(scope="module")
def clipart(tmp_path_factory):
    root = tmp_path_factory.mktemp("oc")
    return builders.build_dataset("openclipart", str(root), max_samples=24, image_size=96, seed=1)


def _rows(root):
    with open(os.path.join(root, "captions.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_openclipart_builder(clipart):
    rows = _rows(clipart)
    assert len(rows) == 24
    categories = set(os.listdir(os.path.join(builders.OPENCLIPART_ROOT, "png")))
    for r in rows:
        assert r["caption"].strip() and r["category"] in categories
        expected = builders.heldout_split(r["key"], 0.1)
        assert r["split"] == expected or (expected, r["split"]) == ("test", "duplicate")
        with Image.open(os.path.join(clipart, r["file"])) as im:
            assert im.mode == "RGB" and max(im.size) <= 96
    with open(os.path.join(clipart, "build.json")) as f:
        info = json.load(f)
    assert info["available"] > 8000  # the Debian package has 8121 PNGs, ~60 without title/description
    # cache: same arguments -> nothing rewritten
    before = os.path.getmtime(os.path.join(clipart, "captions.jsonl"))
    builders.build_dataset("openclipart", clipart, max_samples=24, image_size=96, seed=1)
    assert os.path.getmtime(os.path.join(clipart, "captions.jsonl")) == before


def test_emoji_builder(tmp_path):
    root = builders.build_dataset("emoji", str(tmp_path), max_samples=10, image_size=64)
    rows = _rows(root)
    assert len(rows) >= 9  # a sampled emoji may lack a glyph and be reported
    for r in rows:
        assert r["key"].startswith("emoji-") and ":" not in r["caption"] and "_" not in r["caption"]
        with Image.open(os.path.join(root, r["file"])) as im:
            assert im.size == (64, 64)
            assert im.getextrema() != ((255, 255),) * 3  # something was drawn on the white
    samples = list(builders.iter_samples("emoji", str(tmp_path), max_samples=10, image_size=64, split="train"))
    assert {s.key for s in samples} == {r["key"] for r in rows if r["split"] == "train"}


def test_alt_texts_are_other_human_texts_never_the_caption(clipart):
    """Each sample's other human texts (the demo's oracle rewrites and other-wording queries): fields that
    repeat the caption's words, or an earlier field's, are left out."""
    rows = _rows(clipart)
    with_alt = [r for r in rows if r.get("alt_texts")]
    assert len(with_alt) >= len(rows) // 2
    for r in with_alt:
        assert set(r["alt_texts"]) <= {"title", "description", "keywords"}
        words = [normalize_words(t) for t in [r["caption"], *r["alt_texts"].values()]]
        assert len(set(words)) == len(words), r
        if "keywords" in r["alt_texts"]:
            assert r["alt_texts"]["keywords"] == ", ".join(r["keywords"])
    assert builders.alt_texts("Thumbs up", {"alias 0": "thumbs_up", "alias 1": "+1", "alias 2": "thumbs UP!"}) == \
        {"alias 1": "+1"}
    assert builders.alt_texts("A frog. Green", {"title": "A frog", "description": "", "keywords": "frog"}) == \
        {"title": "A frog", "keywords": "frog"}


def test_heldout_duplicates_of_training_or_earlier_heldout_rows_are_set_aside():
    rows = [{"key": "a", "caption": "A red car", "split": "train", "image": "x"},
            {"key": "b", "caption": "a  red CAR", "split": "test", "image": "y"},   # caption of a train row
            {"key": "c", "caption": "a boat", "split": "test", "image": "x"},       # image of a train row
            {"key": "d", "caption": "a tree", "split": "test", "image": "z"},
            {"key": "e", "caption": "a tree", "split": "test", "image": "w"},       # repeats held-out d
            {"key": "f", "caption": "a house", "split": "test", "image": "z"},      # repeats d's image
            {"key": "g", "caption": "a cat", "split": "test", "image": "v"}]
    assert builders.mark_heldout_duplicates(rows, lambda r: r["image"]) == 4
    assert [r["split"] for r in rows] == ["train", "duplicate", "duplicate", "test", "duplicate", "duplicate",
                                          "test"]


def test_heldout_split_is_fixed():
    keys = [f"{i:09d}" for i in range(4000)]
    splits = [builders.heldout_split(k, 0.1) for k in keys]
    assert splits == [builders.heldout_split(k, 0.1) for k in keys]
    assert 0.08 < splits.count("test") / len(keys) < 0.12


def test_image_folder_jsonl_and_csv_agree(clipart, tmp_path):
    rows = _rows(clipart)
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "path", "caption", "category"])
        for r in rows:
            w.writerow([r["key"], os.path.join(clipart, r["file"]), r["caption"], r["category"]])
    from_jsonl = list(iter_image_folder(clipart, IngestReport()))
    from_csv = list(iter_image_folder(str(tmp_path), IngestReport(), captions_file=str(tmp_path / "captions.csv")))
    assert [(s.key, s.caption, s.read_image()) for s in from_jsonl] == \
           [(s.key, s.caption, s.read_image()) for s in from_csv]
    assert from_csv[0].meta["category"] == rows[0]["category"]


def test_laclip_csv_reports_and_skips(clipart, tmp_path):
    rows = _rows(clipart)[:5]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["relative_image_path", "caption"])
        for r in rows:
            w.writerow([r["file"], r["caption"]])
        w.writerow(["images-96/does_not_exist.jpg", "a missing picture"])
        w.writerow([rows[0]["file"], "   "])
    report = IngestReport()
    samples = list(iter_laclip_csv(str(tmp_path / "train.csv"), clipart, report))
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(5)]
    assert [s.caption for s in samples] == [r["caption"] for r in rows]
    assert report.counts == {"missing_file": 1, "empty_caption": 1}
    assert {(r["reason"], r["key"]) for r in report.records} == {("missing_file", "000000005"),
                                                                 ("empty_caption", "000000006")}
    assert any(r["file"].endswith("does_not_exist.jpg") for r in report.records)


def test_malformed_rows_name_file_and_line(tmp_path):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("relative_image_path,caption\na.jpg,a cat\nb.jpg,a dog,extra\n")
    with pytest.raises(IngestError, match=r"bad\.csv:3: expected 2 fields"):
        list(iter_laclip_csv(str(bad_csv), str(tmp_path), IngestReport()))
    (tmp_path / "captions.jsonl").write_text('{"file": "a.jpg", "caption": "x"}\n{"file": "b.jpg", "capt\n')
    with pytest.raises(IngestError, match=r"captions\.jsonl:2: invalid JSON"):
        list(iter_image_folder(str(tmp_path), IngestReport()))
    (tmp_path / "captions.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n')
    with pytest.raises(IngestError, match=r"captions\.jsonl:1: expected fields 'file'"):
        list(iter_image_folder(str(tmp_path), IngestReport()))


def _write_wds(path, items):
    """img2dataset layout: <key>.jpg, <key>.txt, <key>.json, members of a sample next to each other."""
    with tarfile.open(path, "w") as tar:
        for key, ext, image, caption, meta in items:
            for name, data in ((f"{key}.{ext}", image), (f"{key}.txt", caption.encode()),
                               (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_reader(clipart, tmp_path):
    rows = _rows(clipart)[:6]
    items = []
    for i, r in enumerate(rows):
        with open(os.path.join(clipart, r["file"]), "rb") as f:
            items.append((f"{i:09d}", "jpg", f.read(), r["caption"], {"url": f"http://x/{i}", "key": f"{i:09d}"}))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PNG")
    items.append(("000000006", "png", buf.getvalue(), "a red square", {}))
    items.append(("000000007", "jpg", items[0][2], "", {}))  # empty caption
    _write_wds(tmp_path / "00000.tar", items[:4])
    _write_wds(tmp_path / "00001.tar", items[4:])
    report = IngestReport()
    samples = list(iter_webdataset(str(tmp_path), report))
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(7)]
    assert samples[1].caption == rows[1]["caption"] and samples[1].meta["url"] == "http://x/1"
    assert samples[6].read_image() == buf.getvalue()
    assert report.counts == {"empty_caption": 1} and report.records[0]["key"] == "000000007"
    assert report.records[0]["file"].endswith("00001.tar")
    # the dispatcher recognises each format
    assert [s.key for s in open_source(str(tmp_path / "*.tar"), IngestReport())] == [s.key for s in samples]
    assert len(list(open_source(clipart, IngestReport(), max_samples=3))) == 3


def test_prepare_jpeg(clipart):
    from packing.images import BrokenImage, decode_rgb, prepare_jpeg

    row = _rows(clipart)[0]
    with open(os.path.join(clipart, row["file"]), "rb") as f:
        jpeg = f.read()
    assert prepare_jpeg(jpeg, 512, 90, keep=True)[0] == jpeg  # colour JPEG passes through untouched
    out, h, w = prepare_jpeg(jpeg, 40, 90)
    assert min(h, w) == 40 and decode_rgb(out).shape == (h, w, 3)
    for bad in (jpeg[: len(jpeg) // 3], b"not an image at all"):
        with pytest.raises(BrokenImage):
            prepare_jpeg(bad, 64, 90)
        with pytest.raises(BrokenImage):
            prepare_jpeg(bad, 64, 90, keep=True)
    buf = io.BytesIO()
    Image.new("RGBA", (300, 200), (255, 0, 0, 0)).save(buf, "PNG")  # fully transparent -> white
    out, h, w = prepare_jpeg(buf.getvalue(), 100, 95)
    assert (h, w) == (100, 150) and decode_rgb(out).min() > 240
