"""Fault injection on the data side: flipped bytes, truncation, kill -9 during pack, bad inputs.

Every case reproduces a failure that once hung, crashed with a raw traceback or silently gave wrong data;
each must now end in one clear error naming the file and record (or a counted skip), never a hang.
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch

from benchmarks.corpus import varied_captions
from common.io import is_temp
from loaders import build_loader
from packing.pack import PackConfig, PackError, pack, verify_pack
from loaders.caption_store import CaptionStore, StoreError
from packing.caption_writer import write_store
from model.tokenizer import ClipTokenizer, get_tokenizer

from tests.conftest import REPO


def test_tokenizer_word_cache_filling_mid_batch_keeps_every_word():
    """A 50-word cache is cleared inside most batches: ids must still equal the uncached tokenizer's."""
    small = ClipTokenizer(cache_words=50)
    captions = varied_captions(300, seed=2)
    want = get_tokenizer().encode(captions)
    for start in range(0, len(captions), 7):
        got = small.encode(captions[start:start + 7])
        assert all(np.array_equal(a, b) for a, b in zip(got, want[start:start + 7]))
    assert small._words.num_words <= 50 + 7 * 80  # it was cleared, not grown without bound


# ------------------------------------------------------------------------------------ a small real pack

def every_other_rewritten(i: int, row: dict) -> list[str] | None:
    """Rows 0, 2, 4, ... get 1 or 2 rewrites (alternately); odd rows are not in the rewrites file."""
    return None if i % 2 else [f"an emoji of {row['caption']}"] * (1 + i // 2 % 2)


@pytest.fixture(scope="session")
def source(emoji_source):
    """24 real emoji images with their names as captions, and a rewrites JSONL for half of them."""
    return emoji_source(24, every_other_rewritten)


def pack_options(source, **kw) -> dict:
    args = dict(input=source["folder"], rewrites=source["rewrites"], samples_per_shard=8, max_side=48, workers=1)
    args.update(kw)
    return args


def pack_config(source, out, **kw):
    return PackConfig(out=str(out), **pack_options(source, **kw))


@pytest.fixture(scope="session")
def packed(source, make_pack):
    return make_pack(**pack_options(source))["out"]


def damaged_copy(packed, tmp_path, rel, at, xor=0xFF) -> str:
    """A copy of the pack with one byte of `rel` flipped at offset `at` (negative: from the end)."""
    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    path = copy / rel
    data = bytearray(path.read_bytes())
    data[at] ^= xor
    path.write_bytes(bytes(data))
    return str(copy)


def tar_member(root, shard: str, sample: int, ext: str) -> tuple[int, int]:
    """(offset, size) of a sample's member in a DALI tar, from its index."""
    line = (Path(root) / "dali" / f"{shard}.idx").read_text().splitlines()[1 + sample].split()
    at = line.index(ext)
    return int(line[at + 1]), int(line[at + 2])


def load_all(kind, root, **kw):
    args = dict(batch_size=4, text_mode="rewrite", seed=1, epoch=0, num_workers=0, drop_last=False)
    args.update(kw)
    return [b for b in build_loader(kind, root, **args)]


LOADER_SCRIPT = """
import sys
from loaders import build_loader
for _ in build_loader("torch", sys.argv[1], batch_size=4, seed=1, epoch=0, num_workers=2, drop_last=False,
                      check_records=sys.argv[2] == "1"):
    pass
"""


def run_loader_process(root, check=False, timeout=120):
    """The torch loader with 2 worker processes in a fresh interpreter, as a trainer runs it."""
    return subprocess.run([sys.executable, "-c", LOADER_SCRIPT, str(root), "1" if check else "0"],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


# ------------------------------------------------------------------------------------ corrupt samples

@pytest.mark.parametrize("member", ["cap", "jpg"])
def test_flipped_byte_in_a_tar_sample_is_an_error_naming_the_key_not_a_hang(packed, tmp_path, member):
    """Once: no progress for minutes. The workers ignored SIGTERM, so the parent's exit handler waited
    for them forever after the worker's exception ended the epoch."""
    offset, size = tar_member(packed, "part-00001", 3, member)
    key = (Path(packed) / "keys.txt").read_text().split()[8 + 3]
    root = damaged_copy(packed, tmp_path, "dali/part-00001.tar", offset + size // 2)
    done = run_loader_process(root, check=True)
    assert done.returncode != 0
    assert f"part-00001.tar: sample 11 (key {key})" in done.stderr and "checksum mismatch" in done.stderr


def test_undecodable_caption_record_fails_fast_without_checksums(packed, tmp_path):
    offset, size = tar_member(packed, "part-00000", 2, "cap")
    root = damaged_copy(packed, tmp_path, "dali/part-00000.tar", offset + size // 2)
    done = run_loader_process(root, check=False)
    assert done.returncode != 0 and "sample 2 (key " in done.stderr and "caption record does not decode" in done.stderr


@pytest.mark.slow
def test_flipped_jpeg_byte_that_still_decodes_is_caught_by_record_checksums(packed, tmp_path):
    """Most flips inside the entropy-coded data decode to a wrong image without any error."""
    from ffcv.reader import Reader

    beton = Path(packed) / "ffcv/part-00002.beton"
    row = Reader(str(beton)).metadata[5]
    ptr = int(row["f0"]["data_ptr"])  # field 0 = "image"
    root = damaged_copy(packed, tmp_path, "ffcv/part-00002.beton", ptr + 600, xor=0x01)
    clean = load_all("ffcv", root)  # unchecked: a silently different image
    assert len(clean) == 6
    with pytest.raises(PackError, match=r"part-00002\.beton: sample 21 \(key emoji-.*\): JPEG .*checksum"):
        load_all("ffcv", root, check_records=True)


@pytest.mark.slow
def test_record_checksums_change_nothing_on_a_sound_pack(packed):
    for kind in ("torch", "ffcv"):
        plain, checked = load_all(kind, packed), load_all(kind, packed, check_records=True)
        assert all(torch.equal(a, b) for x, y in zip(plain, checked) for a, b in zip(x, y))


# ------------------------------------------------------------------------------------ verify_pack

def store_offsets(packed) -> dict:
    from loaders.caption_store import ShardFile

    shard = ShardFile(str(Path(packed) / "captions" / "shard-00000.lcs"))
    return {"record": int(shard.offsets[5]) + 3, "index": shard.footer["index_offset"] + 8 * 4 + 1,
            "crc": shard.footer["crc_offset"]}


@pytest.mark.parametrize("victim", ["record", "index", "crc", "manifest", "checksums", "keys"])
def test_verify_pack_with_checksums_sees_a_flipped_byte_in_every_file_it_wrote(packed, tmp_path, victim):
    rel, at = {"manifest": ("captions/manifest.json", 30),
               "checksums": ("checksums/part-00001.crc32", 9), "keys": ("keys.txt", 3)}.get(
        victim, ("captions/shard-00000.lcs", None))
    at = store_offsets(packed)[victim] if at is None else at
    root = damaged_copy(packed, tmp_path, rel, at, xor=0x80 if victim == "manifest" else 0x01)
    verify_pack(str(packed), checksums=True)
    with pytest.raises(PackError, match=re.escape(rel.split("/")[-1])):
        verify_pack(root, checksums=True)


def test_corrupted_caption_manifest_or_dictionary_is_one_clear_error_for_readers(packed, tmp_path):
    root = damaged_copy(packed, tmp_path, "captions/manifest.json", 30, xor=0x80)  # not UTF-8 any more
    with pytest.raises(StoreError, match=r"manifest\.json: corrupted manifest"):
        CaptionStore(os.path.join(root, "captions"))
    with pytest.raises(StoreError, match=r"manifest\.json"):
        load_all("torch", root)
    # (24 samples are too few to train a dictionary on: a store of 300 captions has one)
    store = write_store(str(tmp_path / "store"), [[c] for c in varied_captions(300, seed=4)], progress=False)
    path = Path(store) / "dictionary.zdict"
    data = bytearray(path.read_bytes())
    assert len(data) > 1000
    data[500] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"dictionary\.zdict: checksum mismatch"):
        CaptionStore(store)


# ------------------------------------------------------------------------------------ pack: stale work, kills

def test_pack_rerun_with_other_settings_restages_instead_of_reusing(source, tmp_path):
    """Stage 1 done under max_side 48 (then the run stops: its rewrites match nothing), re-run at 24
    without rewrites: every image must be 24 px and meta must say so."""
    bad = tmp_path / "other.jsonl"
    bad.write_text(json.dumps({"key": "no-such-sample", "rewrites": ["x"]}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(PackError, match=r"other\.jsonl: none of its 1 keys matches"):
        pack(pack_config(source, out, rewrites=str(bad)))
    assert sorted(os.listdir(out / "staging"))  # staged parts were left behind
    leftover = out / ".keys.txt.99999.tmp"  # what a run killed while writing keys.txt leaves
    leftover.write_text("k\n")
    pack(pack_config(source, out, rewrites=None, max_side=24))
    assert not leftover.exists()
    meta = verify_pack(str(out), checksums=True)
    assert meta["image"]["max_side"] == 24 and meta["source"]["rewrites"] is None
    from loaders.packed import TarShards, read_meta

    shards = TarShards(read_meta(out))
    sizes = {simplejpeg.decode_jpeg_header(bytes(shards.jpeg(i)))[:2] for i in range(meta["num_samples"])}
    assert max(min(hw) for hw in sizes) == 24
    assert CaptionStore(str(out / "captions")).num_texts == meta["num_samples"]  # originals only
    with pytest.raises(PackError, match=r"already packed with other settings \(.*max_side: 24 -> 48"):
        pack(pack_config(source, out, rewrites=None))


def files_digest(out) -> dict:
    meta = json.loads((Path(out) / "meta.json").read_text())
    files = {rel: f["sha256"] for s in meta["shards"] for rel, f in s["files"].items()}
    return {**files, **{rel: f["sha256"] for rel, f in meta["files"].items()}}


PACK_SCRIPT = "from packing.pack import cli; cli()"


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_kill_9_at_random_points_of_pack_then_rerun_gives_the_uninterrupted_output(source, packed, tmp_path):
    out = tmp_path / "killed"
    argv = [sys.executable, "-c", PACK_SCRIPT, "--input", source["folder"], "--out", str(out),
            "--rewrites", source["rewrites"], "--samples-per-shard", "8", "--max-side", "48", "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(11)
    for _ in range(3):  # each kill lands somewhere in staging, captions or the final shards
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 9.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert files_digest(out) == files_digest(packed)
    leftovers = [str(p) for p in out.rglob("*") if is_temp(p.name)]
    assert not leftovers and not (out / "staging").exists()


# ------------------------------------------------------------------------------------ bad inputs

def run_pack_cli(*args):
    return subprocess.run([sys.executable, "-c", PACK_SCRIPT, *map(str, args), "--workers", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_rewrites_matching_no_sample_fail_with_one_line(source, tmp_path):
    bad = tmp_path / "rw.jsonl"
    bad.write_text("".join(json.dumps({"key": f"other-{i}", "rewrites": ["x"]}) + "\n" for i in range(3)))
    done = run_pack_cli("--input", source["folder"], "--out", tmp_path / "out", "--rewrites", bad,
                        "--samples-per-shard", 8, "--max-side", 24)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"pack: error: {bad}: none of its 3 keys matches")


def test_non_utf8_caption_file_is_one_line_naming_file_and_line(source, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(source["folder"], folder)
    lines = (folder / "captions.jsonl").read_bytes().split(b"\n")
    lines[4] = lines[4].replace(b'"caption": "', b'"caption": "caf\xe9 ')  # Latin-1, not UTF-8
    (folder / "captions.jsonl").write_bytes(b"\n".join(lines))
    done = run_pack_cli("--input", folder, "--out", tmp_path / "out", "--max-side", 24)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{folder}/captions.jsonl:5: not UTF-8 text" in done.stderr


def test_caption_or_rewrite_with_no_text_left_is_skipped_with_a_count(source, packed, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(source["folder"], folder)
    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]
    rows[3]["caption"] = "\x01\x02"  # ftfy drops control characters: nothing to tokenize
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rewrites = tmp_path / "rw.jsonl"
    rewrites.write_text(json.dumps({"key": rows[0]["key"], "rewrites": ["a real rewrite", "\x7f", " "]}) + "\n")
    summary = pack(pack_config({**source, "folder": str(folder)}, tmp_path / "out", rewrites=str(rewrites)))
    assert summary["skipped"] == {"empty_caption": 1}
    assert summary["num_samples"] == verify_pack(str(packed))["num_samples"] - 1
    assert rows[3]["key"] in json.dumps(summary["skipped_examples"])
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["text_counts"]["empty_rewrites_dropped"] == 2
    assert plan["dropped_rewrites"][0] == {"file": str(rewrites), "key": rows[0]["key"]}
    store = CaptionStore(str(tmp_path / "out" / "captions"))
    assert all(len(t) > 0 for i in range(len(store)) for t in store.texts(i))
