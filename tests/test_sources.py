"""Input sources as users have them: webdataset brace lists of shards, `python -m rewrite` straight from
img2dataset tars and parquet tables."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from loaders.ingest import IngestError, IngestReport, expand_shards, iter_webdataset
from rewrite.inputs import read_captions

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
    from loaders.pack import PackConfig, pack
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
