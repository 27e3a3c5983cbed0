"""Input sources as users have them: webdataset brace lists of shards, `python -m rewrite` straight from
img2dataset tars and parquet tables."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from packing.ingest import IngestError, IngestReport, expand_shards, iter_webdataset
from rewrite.inputs import read_captions
from tests.conftest import REPO

CAPTIONS = ["a white dog running on the beach", "red car parked on a street", "Christmas light",
            "a bowl of fresh fruit on a wooden table", "two people riding bikes in the city"]


def _jpeg() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def img2dataset_tars(root, shards=3, per_shard=2, caption_in="txt"):
    """Shards as img2dataset writes them: key.jpg, key.txt (caption), key.json (metadata with caption)."""
    root.mkdir(parents=True, exist_ok=True)
    image, n = _jpeg(), 0
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for _ in range(per_shard):
                key, caption = f"{s:05d}{n:04d}", CAPTIONS[n % len(CAPTIONS)]
                members = [(f"{key}.jpg", image),
                           (f"{key}.json", json.dumps({"key": key, "caption": caption, "status": "success"}).encode())]
                if caption_in == "txt":
                    members.append((f"{key}.txt", caption.encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1
    return root


def test_brace_lists_expand_like_webdataset(tmp_path):
    d = img2dataset_tars(tmp_path / "shards", shards=4)
    assert expand_shards(str(d / "{00000..00002}.tar")) == [str(d / f"{i:05d}.tar") for i in range(3)]
    assert expand_shards(str(d / "0000{1,3}.tar")) == [str(d / "00001.tar"), str(d / "00003.tar")]
    assert expand_shards([str(d / "{00000..00001}.tar"), str(d / "*.tar")]) == \
        [str(d / f"{i:05d}.tar") for i in range(4)]                          # lists: order kept, no repeats
    report = IngestReport()
    assert len(list(iter_webdataset(str(d / "{00000..00003}.tar"), report))) == 8
    with pytest.raises(IngestError, match=r"2 of 6 shards do not exist \(first: .*00004\.tar\)"):
        expand_shards(str(d / "{00000..00005}.tar"))


def test_pack_reads_a_brace_list(tmp_path):
    from packing.pack import PackConfig, pack
    d = img2dataset_tars(tmp_path / "shards", shards=3)
    out = pack(PackConfig(input=str(d / "{00000..00001}.tar"), out=str(tmp_path / "packed"), max_side=32,
                          workers=1))
    assert out["num_samples"] == 4 and out["complete"]


@pytest.mark.parametrize("caption_in", ["txt", "json"])
def test_rewrite_reads_img2dataset_tars(tmp_path, caption_in):
    from rewrite.config import RewriteConfig
    from rewrite.pipeline import run
    from rewrite.store import load_rewrites
    d = img2dataset_tars(tmp_path / "shards", caption_in=caption_in)
    rows = read_captions(str(d / "{00000..00002}.tar"))
    assert rows == [(f"{i // 2:05d}{i:04d}", CAPTIONS[i % 5]) for i in range(6)]
    assert read_captions(str(d)) == rows == read_captions(str(d / "*.tar"))
    cfg = RewriteConfig(input=str(d / "{00000..00002}.tar"), out=str(tmp_path / "store"), engine="eda",
                        pools=["coco"], shard_size=4, progress=False)
    assert run(cfg)["shards_written"] == 2                                 # 6 captions, 4 per shard
    store = load_rewrites(cfg.out)
    assert sorted(store) == [k for k, _ in rows] and all(len(v) == 1 for v in store.values())


def test_rewrite_reads_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    keys = [f"{i:09d}" for i in range(5)]
    pq.write_table(pa.table({"key": keys, "caption": CAPTIONS, "url": ["http://x"] * 5,
                             "status": ["success", "success", "failed_to_download", "success", "success"]}),
                   tmp_path / "00000.parquet")
    assert read_captions(tmp_path / "00000.parquet") == [(k, c) for i, (k, c) in enumerate(zip(keys, CAPTIONS))
                                                         if i != 2]
    pq.write_table(pa.table({"url": ["http://x"] * 5, "TEXT": CAPTIONS}), tmp_path / "input.parquet")
    assert read_captions(tmp_path / "input.parquet") == [(f"{i:09d}", c) for i, c in enumerate(CAPTIONS)]
    pq.write_table(pa.table({"url": ["http://x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: columns \['url'\] need 'caption'"):
        read_captions(tmp_path / "bad.parquet")


def test_unreadable_tar_names_the_file(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"not a tar at all" * 40)
    with pytest.raises(ValueError, match=r"00000\.tar: not a readable tar"):
        read_captions(str(tmp_path / "00000.tar"))


def test_pack_lists_skipped_samples_in_a_report(tmp_path):
    """A truncated JPEG and a sample without a caption are listed in skipped.jsonl with key, file, reason;
    the report stays after the staging files are gone."""
    from packing.pack import PackConfig, pack
    d = img2dataset_tars(tmp_path / "shards", shards=2, per_shard=3)
    with tarfile.open(d / "00001.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(d / "00001.tar", "w") as tar:
        for m, data in members:
            if m.name == "000010003.jpg":
                data = data[: len(data) // 3]                                  # a truncated download
            if m.name in ("000010004.txt", "000010004.json"):
                continue                                                       # no caption at all
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    out = tmp_path / "packed"
    summary = pack(PackConfig(input=str(d / "{00000..00001}.tar"), out=str(out), max_side=32, workers=1))
    assert summary["num_samples"] == 4 and not (out / "staging").exists()
    rows = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    by_key = {r["key"]: r for r in rows}
    assert set(by_key) == {"000010003", "000010004"}
    assert by_key["000010003"]["reason"] == "broken_image" and "00001.tar" in by_key["000010003"]["file"]
    assert "00001.tar" in by_key["000010004"]["file"] and by_key["000010004"]["reason"] == "empty_caption"
    assert {r["shard"] for r in rows} == {"part-00001"}
    assert sum(summary["skipped"].values()) == 2


def test_pack_cli_folder_without_captions_is_one_line(tmp_path):
    import subprocess
    import sys
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.jpg")
    proc = subprocess.run([sys.executable, "-m", "packing", "--input", str(tmp_path / "imgs"), "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"pack: error: {tmp_path / 'imgs'}: a folder with neither a captions file (captions.jsonl or " \
                   "captions.csv) nor .tar shards"
    assert "Traceback" not in proc.stderr
