"""Packing real images into FFCV and DALI shards, read back with FFCV's Loader and DALI's webdataset reader
(both on CPU), plus re-runs, ranks and damaged files."""
import csv
import hashlib
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import simplejpeg

from packing import builders
from packing.pack import PackConfig, PackError, load_rewrites, pack, verify_pack
from loaders.caption_store import CaptionStore
from model.tokenizer import get_tokenizer

N_SOURCE = 50  # one of them is a corrupted JPEG


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """img2dataset-style tars from 50 real openclipart images (one truncated) + a rewrites JSONL."""
    root = tmp_path_factory.mktemp("src")
    folder = builders.build_dataset("openclipart", str(root / "oc"), max_samples=N_SOURCE, image_size=300, seed=3)
    with open(os.path.join(folder, "captions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == N_SOURCE
    for part in range(3):  # three input tars -> three output shards
        with tarfile.open(root / f"{part:05d}.tar", "w") as tar:
            for i in range(part * 20, min(N_SOURCE, part * 20 + 20)):
                with open(os.path.join(folder, rows[i]["file"]), "rb") as f:
                    image = f.read()
                if i == 7:
                    image = image[: len(image) // 3]  # truncated download
                for name, data in ((f"{i:09d}.jpg", image), (f"{i:09d}.txt", rows[i]["caption"].encode()),
                                   (f"{i:09d}.json", json.dumps({"key": f"{i:09d}"}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    rewrites = {f"{i:09d}": [f"rewrite {j} of {rows[i]['caption']}" for j in range(1 + i % 4)]
                for i in range(0, N_SOURCE, 2)}
    with open(root / "rewrites.jsonl", "w") as f:
        for key, texts in rewrites.items():
            f.write(json.dumps({"key": key, "rewrites": texts}) + "\n")
    return {"root": root, "folder": folder, "rows": rows, "rewrites": rewrites}


@pytest.fixture(scope="module")
def packed(source, make_pack):
    built = make_pack(input=str(source["root"] / "*.tar"), rewrites=str(source["root"] / "rewrites.jsonl"),
                      max_side=128, quality=85, workers=2)
    return {**built, **source}


def test_pack_summary_reports_broken_image(packed):
    s = packed["summary"]
    assert s["num_samples"] == N_SOURCE - 1
    assert s["skipped"] == {"broken_image": 1}
    assert [(r["key"], r["reason"]) for r in s["skipped_examples"]] == [("000000007", "broken_image")]
    assert s["skipped_examples"][0]["file"].endswith("00000.tar:000000007")
    meta = verify_pack(packed["out"], checksums=True)
    assert [sh["num_samples"] for sh in meta["shards"]] == [19, 20, 10]
    assert meta["text_counts"]["with_rewrites"] == 25
    with open(os.path.join(packed["out"], "keys.txt")) as f:
        keys = f.read().split()
    assert keys == [f"{i:09d}" for i in range(N_SOURCE) if i != 7]


def test_captions_joined_with_rewrites_by_key(packed):
    store = CaptionStore(os.path.join(packed["out"], "captions"))
    tok = get_tokenizer()
    with open(os.path.join(packed["out"], "keys.txt")) as f:
        keys = f.read().split()
    for i, key in enumerate(keys):
        expected = [packed["rows"][int(key)]["caption"]] + packed["rewrites"].get(key, [])
        got = store.texts(i)
        assert len(got) == len(expected)
        for a, b in zip(got, tok.encode(expected)):
            np.testing.assert_array_equal(a, b)


def _dali_members(out, name):
    members = {}
    with tarfile.open(os.path.join(out, "dali", name + ".tar")) as tar:
        for m in tar:
            members[m.name] = tar.extractfile(m).read()
    return members


def test_dali_index_matches_wds2idx(packed, tmp_path):
    import wds2idx  # DALI's own indexer (nvidia-dali ships it)

    tar = os.path.join(packed["out"], "dali", "part-00001.tar")
    with wds2idx.IndexCreator(tar, str(tmp_path / "ref.idx"), verbose=False) as creator:
        creator.create_index()
    with open(tmp_path / "ref.idx") as a, open(tar[:-4] + ".idx") as b:
        assert a.read() == b.read()


def test_ffcv_roundtrip(packed):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.bytes import BytesDecoder
    from ffcv.fields.decoders import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader

    from ffcv.types import HeaderType

    from loaders.packed import FFCV_HEADER

    assert FFCV_HEADER == HeaderType  # verify_pack reads .beton headers without importing ffcv
    out = packed["out"]
    meta = verify_pack(out)
    store = CaptionStore(os.path.join(out, "captions"))
    for shard in meta["shards"]:
        path = os.path.join(out, "ffcv", shard["name"] + ".beton")
        members = _dali_members(out, shard["name"])
        reader = Reader(path)
        assert reader.num_samples == shard["num_samples"]
        sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
        with open(path, "rb") as f:
            raw = f.read()
        assert reader.field_names == ["image", "record", "record_len", "index"]
        for j, row in enumerate(reader.metadata):
            image, _, record_len, index = (row[f"f{k}"] for k in range(4))  # metadata columns are f0..f3
            assert int(index) == shard["first_index"] + j and int(record_len) == len(store.record(int(index)))
            jpeg = members[f"{_key_at(out, int(index))}.jpg"]
            ptr = int(image["data_ptr"])
            assert raw[ptr: ptr + sizes[ptr]] == jpeg  # byte-identical JPEG in both formats
            h, w, _, _ = simplejpeg.decode_jpeg_header(jpeg)
            assert (int(image["height"]), int(image["width"])) == (h, w) and min(h, w) <= 128
    # and FFCV's own loader decodes everything, in order, on CPU
    path = os.path.join(out, "ffcv", "part-00001.beton")
    loader = Loader(path, batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((64, 64), 1.0)], "record": [BytesDecoder()],
                               "record_len": [IntDecoder()], "index": [IntDecoder()]})
    seen = []
    for images, records, lengths, indices in loader:
        assert images.shape[1:] == (64, 64, 3) and images.dtype == np.uint8
        for rec, n, i in zip(records, lengths[:, 0], indices[:, 0]):
            assert bytes(rec[:n]) == store.record(int(i))  # rows come back padded: trim by record_len
            seen.append(int(i))
    first = meta["shards"][1]["first_index"]
    assert seen == list(range(first, first + meta["shards"][1]["num_samples"]))


def _key_at(out, index):
    with open(os.path.join(out, "keys.txt")) as f:
        return f.read().split()[index]


def test_dali_webdataset_roundtrip(packed):
    from nvidia.dali import fn, pipeline_def, types

    out = packed["out"]
    meta = verify_pack(out)
    store = CaptionStore(os.path.join(out, "captions"))
    tars = [os.path.join(out, "dali", s["name"] + ".tar") for s in meta["shards"]]

    @pipeline_def(batch_size=7, num_threads=1, device_id=None)  # CPU only
    def pipe():
        jpg, cap, idx = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                              ext=["jpg", "cap", "idx"], random_shuffle=False,
                                              missing_component_behavior="error", name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cap, idx

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == meta["num_samples"]
    seen = []
    for _ in range(meta["num_samples"] // 7):
        images, caps, idxs = p.run()
        for k in range(7):
            i = int(bytes(idxs.at(k)).decode())
            assert bytes(caps.at(k)) == store.record(i)
            assert images.at(k).ndim == 3 and min(images.at(k).shape[:2]) <= 128
            seen.append(i)
    assert seen == list(range(meta["num_samples"]))


def test_rerun_skips_finished_shards(packed):
    out, cfg = packed["out"], packed["cfg"]
    assert pack(cfg)["new_samples"] == 0  # complete: nothing to do
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in ("ffcv/part-00000.beton", "dali/part-00002.tar")}
    with open(os.path.join(out, "meta.json")) as f:
        meta_before = json.load(f)
    # as if the run had died while writing shard 1: its final marker and meta.json are missing
    os.remove(os.path.join(out, "meta.json"))
    os.remove(os.path.join(out, "shards", "part-00001.json"))
    summary = pack(cfg)
    assert summary["new_samples"] == 20 and summary["finalized_samples"] == 20
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in mtimes} == mtimes
    assert verify_pack(out, checksums=True)["shards"] == meta_before["shards"]


def test_truncated_files_are_detected(packed, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(packed["out"], out)
    for rel in ("ffcv/part-00001.beton", "dali/part-00002.tar"):
        path = os.path.join(out, rel)
        with open(path, "rb+") as f:
            f.truncate(os.path.getsize(path) - 700)
        with pytest.raises(PackError, match=rf"{rel}: \d+ bytes, expected \d+ \(truncated"):
            verify_pack(out)
        shutil.copy(os.path.join(packed["out"], rel), path)
    verify_pack(out)
    # a flipped byte keeps the size: only the checksum pass sees it
    path = os.path.join(out, "dali/part-00000.tar")
    data = bytearray(open(path, "rb").read())
    data[2000] ^= 0xFF
    open(path, "wb").write(bytes(data))
    verify_pack(out)
    with pytest.raises(PackError, match="sha256 mismatch"):
        verify_pack(out, checksums=True)


def test_two_ranks_equal_one(source, tmp_path):
    """LaCLIP CSV input with rewrites in shards of 12, packed by ranks 1 and 0 taking turns (each runs until it
    must wait for the other: staging, the key-hash-sharded join, the caption store), equals a 1-rank pack."""
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["relative_image_path", "caption"])
        for r in source["rows"][:30]:
            w.writerow([r["file"], r["caption"]])
    with open(tmp_path / "rw.jsonl", "w") as f:
        for i, r in enumerate(source["rows"][:30:2]):
            f.write(json.dumps({"key": r["file"],
                                "rewrites": [f"rewrite {j} of {r['caption']}" for j in range(i % 3)]}) + "\n")
    common = dict(input=str(tmp_path / "train.csv"), image_root=source["folder"], samples_per_shard=12,
                  max_side=64, workers=1, rewrites=str(tmp_path / "rw.jsonl"))
    single = pack(PackConfig(out=str(tmp_path / "one"), **common))
    two, turns, done = str(tmp_path / "two"), 0, [False, False]
    while not all(done):
        for rank in (1, 0):
            done[rank] = pack(PackConfig(out=two, rank=rank, world_size=2, **common))["complete"]
        turns += 1
        assert turns <= 6
    assert turns > 1  # the ranks did wait for each other
    meta = verify_pack(two, checksums=True)
    assert meta["num_samples"] == single["num_samples"] == 30
    assert meta["text_counts"] == verify_pack(str(tmp_path / "one"))["text_counts"]
    assert meta["text_counts"]["with_rewrites"] == 10
    stores = [CaptionStore(os.path.join(d, "captions")) for d in (two, tmp_path / "one")]
    for i in range(30):
        assert all(np.array_equal(a, b) for a, b in zip(stores[0].texts(i), stores[1].texts(i)))
    for rel in ("keys.txt", "dali/part-00000.tar", "dali/part-00001.tar", "dali/part-00002.idx"):
        digests = [hashlib.sha256(open(os.path.join(d, rel), "rb").read()).hexdigest() for d in (two, tmp_path / "one")]
        assert digests[0] == digests[1], rel


def test_rewrites_jsonl_errors(tmp_path):
    path = tmp_path / "rw.jsonl"
    path.write_text('{"key": "a", "rewrites": ["x"]}\n{"key": "b"}\n')
    with pytest.raises(PackError, match=r"rw\.jsonl:2"):
        load_rewrites(str(path))
    path.write_text('{"key": "a", "rewrites": ["x"]}\n\n{"key": "b", "rewrites": []}\n')
    assert load_rewrites(str(path)) == {"a": ["x"], "b": []}


def write_laclip_csv(path, rows) -> None:
    """LaCLIP's caption CSV: relative_image_path,caption."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["relative_image_path", "caption"])
        for r in rows:
            w.writerow([r["file"], r["caption"]])


def test_laclip_csv_with_rewrite_store(source, tmp_path):
    """LaCLIP's release: CSV + line-aligned rewrite .txt files, imported by rewrite/, joined at pack time."""
    from rewrite import import_laclip

    rows = source["rows"][:10]
    write_laclip_csv(tmp_path / "cc.csv", rows)
    for name in ("chatgpt", "bard"):
        (tmp_path / f"{name}.txt").write_text("".join(f"{name} says {r['caption']}\n" for r in rows))
    store_dir = import_laclip(tmp_path / "cc.csv", [tmp_path / "chatgpt.txt", tmp_path / "bard.txt"], tmp_path / "rw")
    out = str(tmp_path / "packed")
    summary = pack(PackConfig(input=str(tmp_path / "cc.csv"), out=out, image_root=source["folder"],
                              rewrites=str(store_dir), max_side=64, workers=1))
    assert summary["num_samples"] == 10
    meta = verify_pack(out)
    assert meta["source"]["rewrites_matched"] == 10 and meta["text_counts"]["texts"] == 30
    store, tok = CaptionStore(os.path.join(out, "captions")), get_tokenizer()
    for i, r in enumerate(rows):
        expected = tok.encode([r["caption"], f"chatgpt says {r['caption']}", f"bard says {r['caption']}"])
        assert all(np.array_equal(a, b) for a, b in zip(store.texts(i), expected))


def test_rewrite_equal_to_its_original_is_dropped_and_counted(source, tmp_path):
    """An EDA output with nothing changed, or a store padded with the original, is not a rewrite: the
    pack keeps one copy of the caption (up to case, punctuation and spacing) and counts the rest."""
    from rewrite import import_laclip

    rows = source["rows"][:10]
    write_laclip_csv(tmp_path / "cc.csv", rows)
    (tmp_path / "eda.txt").write_text("".join(f"{r['caption'].upper()} .\n" for r in rows))
    (tmp_path / "llm.txt").write_text("".join(f"a drawing: {r['caption']}\n" for r in rows))
    store_dir = import_laclip(tmp_path / "cc.csv", [tmp_path / "eda.txt", tmp_path / "llm.txt"], tmp_path / "rw")
    out = str(tmp_path / "packed")
    pack(PackConfig(input=str(tmp_path / "cc.csv"), out=out, image_root=source["folder"], rewrites=str(store_dir),
                    max_side=64, workers=1))
    counts = verify_pack(out)["text_counts"]
    assert counts["texts"] == 20 and counts["same_as_original_dropped"] == 10 and counts["with_rewrites"] == 10
    store, tok = CaptionStore(os.path.join(out, "captions")), get_tokenizer()
    for i, r in enumerate(rows):
        expected = tok.encode([r["caption"], f"a drawing: {r['caption']}"])
        assert len(store.texts(i)) == 2 and all(np.array_equal(a, b) for a, b in zip(store.texts(i), expected))


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for name, data in ((f"{key}.jpg", image), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_duplicate_sample_key_names_the_key_and_repeated_rewrite_rows_concatenate(source, tmp_path):
    rows = source["rows"][:4]
    images = [open(os.path.join(source["folder"], r["file"]), "rb").read() for r in rows]
    _tar(tmp_path / "00000.tar", [(f"k{i}", images[i], rows[i]["caption"]) for i in range(2)])
    _tar(tmp_path / "00001.tar", [("k2", images[2], rows[2]["caption"]), ("k0", images[3], "again")])
    with pytest.raises(PackError, match=r"part-00001\.json: duplicate sample key 'k0'"):
        pack(PackConfig(input=str(tmp_path / "*.tar"), out=str(tmp_path / "dup"), max_side=64, workers=1))
    os.remove(tmp_path / "00001.tar")
    (tmp_path / "rw.jsonl").write_text('{"key": "k1", "rewrites": ["one"]}\n{"key": "k9", "rewrites": ["x"]}\n'
                                       '{"key": "k1", "rewrites": ["two", "three"]}\n')
    out = str(tmp_path / "ok")
    pack(PackConfig(input=str(tmp_path / "00000.tar"), out=out, rewrites=str(tmp_path / "rw.jsonl"),
                    max_side=64, workers=1))
    meta = verify_pack(out)
    assert meta["source"]["rewrites_given"] == 2 and meta["source"]["rewrites_matched"] == 1
    store, tok = CaptionStore(os.path.join(out, "captions")), get_tokenizer()
    expected = tok.encode([rows[1]["caption"], "one", "two", "three"])
    assert all(np.array_equal(a, b) for a, b in zip(store.texts(1), expected))
    assert not os.path.exists(os.path.join(out, "staging", "join.sqlite"))
