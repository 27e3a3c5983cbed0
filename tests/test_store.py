"""The packed caption store: round trip, draws, workers, the 77 cut, corruption and re-runs."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from common.io import is_temp
from loaders.sampling import draw_text_index
from loaders.caption_codec import RecordCodec, StoreError, pad_tokens
from loaders.caption_store import CaptionStore
from packing.caption_writer import write_store
from model.tokenizer import CONTEXT_LENGTH, get_tokenizer
from benchmarks.corpus import varied_captions


def _records(n, seed=0):
    """n samples with 0..4 rewrites each (real names and titles as texts)."""
    texts = varied_captions(5 * n, seed=seed)
    rng = np.random.default_rng(seed)
    out, pos = [], 0
    for _ in range(n):
        k = 1 + int(rng.integers(0, 5))
        out.append(texts[pos:pos + k])
        pos += k
    return out


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("store") / "captions")
    records = _records(3000)
    write_store(path, records, samples_per_shard=1100, block_size=64, progress=False)
    return path, records


def test_round_trip_across_shards(store_dir):
    path, records = store_dir
    store = CaptionStore(path)
    tok = get_tokenizer()
    assert len(store) == len(records) and len(store.manifest["shards"]) == 3
    assert store.num_texts == sum(map(len, records))
    for i in [0, 1, 1099, 1100, 2199, 2200, 2999]:
        got = store.texts(i)
        want = tok.encode(records[i])
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_draw_and_all_texts_pad_like_the_tokenizer(store_dir):
    path, records = store_dir
    store = CaptionStore(path)
    padded = get_tokenizer()(records[7]).numpy()
    k = draw_text_index(seed=3, epoch=1, sample_index=7, n_texts=len(records[7]))
    assert np.array_equal(store.draw(7, seed=3, epoch=1), padded[k])
    tokens, mask = store.all_texts(7, max_texts=6)
    assert tokens.shape == (6, CONTEXT_LENGTH) and tokens.dtype == np.int32
    assert mask.tolist() == [j < len(records[7]) for j in range(6)]
    assert np.array_equal(tokens[:len(records[7])], padded) and not tokens[len(records[7]):].any()


def test_empty_rewrite_lists_and_the_77_cut(tmp_path):
    long = "a very long caption " * 40
    records = [["just the original"], [long, "short rewrite"], [""]] * 30
    write_store(str(tmp_path / "s"), records, progress=False)
    store = CaptionStore(str(tmp_path / "s"))
    assert [len(store.texts(i)) for i in range(3)] == [1, 2, 1]
    assert all(store.draw(0, seed=0, epoch=e)[1] == store.draw(0, seed=0, epoch=0)[1] for e in range(10))
    cut = store.texts(1)[0]
    assert len(cut) == CONTEXT_LENGTH - 2
    row = store.all_texts(1, 2)[0][0]
    assert row[-1] == get_tokenizer().eot_token_id and np.array_equal(row, get_tokenizer()([long])[0].numpy())
    assert store.draw(2, 0, 0).tolist()[:3] == [get_tokenizer().sot_token_id, get_tokenizer().eot_token_id, 0]


def test_draws_are_deterministic_and_independent_of_worker_split(store_dir):
    path, records = store_dir
    n = np.array([len(r) for r in records])
    idx = np.arange(len(records))
    full = draw_text_index(5, 2, idx, n)
    assert np.array_equal(full, draw_text_index(5, 2, idx, n))
    # Any split of the indices (as workers or ranks would read them) draws the same texts.
    parts = [draw_text_index(5, 2, idx[w::3], n[w::3]) for w in range(3)]
    for w in range(3):
        assert np.array_equal(parts[w], full[w::3])
    assert [draw_text_index(5, 2, int(i), int(n[i])) for i in range(50)] == full[:50].tolist()
    assert not np.array_equal(full, draw_text_index(5, 3, idx, n)), "a new epoch draws anew"
    assert not np.array_equal(full, draw_text_index(6, 2, idx, n)), "a new seed draws anew"


@pytest.mark.parametrize("n_texts", [2, 5, 7])
def test_draws_are_uniform_chi_square(n_texts):
    from scipy.stats import chi2

    draws = np.concatenate([draw_text_index(0, epoch, np.arange(20_000), n_texts) for epoch in range(5)])
    counts = np.bincount(draws, minlength=n_texts)
    expected = len(draws) / n_texts
    statistic = ((counts - expected) ** 2 / expected).sum()
    assert statistic < chi2.ppf(0.999, n_texts - 1), counts
    # Across epochs one sample's draws are uniform too.
    per_sample = np.array([draw_text_index(1, e, 12345, n_texts) for e in range(3000)])
    counts = np.bincount(per_sample, minlength=n_texts)
    expected = len(per_sample) / n_texts
    assert ((counts - expected) ** 2 / expected).sum() < chi2.ppf(0.999, n_texts - 1)


def _read_in_worker(args):
    store, indices = args
    return [store.draw(int(i), seed=1, epoch=0).tolist() for i in indices]


def test_many_worker_processes_read_one_store(store_dir):
    path, _ = store_dir
    store = CaptionStore(path)
    indices = np.random.default_rng(0).permutation(len(store))[:600]
    serial = _read_in_worker((store, indices))
    loader = torch.utils.data.DataLoader(
        [(store, chunk) for chunk in np.array_split(indices, 6)], batch_size=None, num_workers=2,
        collate_fn=_read_in_worker)
    parallel = [row for rows in loader for row in rows]
    assert parallel == serial


def test_flipped_byte_is_reported_with_file_and_sample(store_dir, tmp_path):
    path, _ = store_dir
    copy = str(tmp_path / "copy")
    shutil.copytree(path, copy)
    shard = os.path.join(copy, "shard-00001.lcs")
    healthy = CaptionStore(copy)
    start = int(healthy._shard(1).offsets[200])  # a byte inside sample 1100 + 200
    with open(shard, "r+b") as f:
        f.seek(start + 3)
        byte = f.read(1)
        f.seek(start + 3)
        f.write(bytes([byte[0] ^ 0x40]))
    store = CaptionStore(copy)
    store.texts(1100 + 10 * 64)  # another block of the same shard still reads
    with pytest.raises(StoreError, match=r"shard-00001\.lcs.*block 3 \(samples 192-255\).*sample 200"):
        store.texts(1100 + 200)


def test_truncated_shard_and_missing_manifest_are_clear_errors(store_dir, tmp_path):
    path, _ = store_dir
    copy = str(tmp_path / "copy")
    shutil.copytree(path, copy)
    shard = os.path.join(copy, "shard-00002.lcs")
    os.truncate(shard, os.path.getsize(shard) - 100)
    store = CaptionStore(copy)
    store.texts(5)
    with pytest.raises(StoreError, match=r"shard-00002\.lcs: truncated"):
        store.texts(2500)
    os.remove(os.path.join(copy, "manifest.json"))
    with pytest.raises(StoreError, match="no manifest.json"):
        CaptionStore(copy)


def test_rerun_skips_finished_shards_and_redoes_a_half_written_one(tmp_path):
    records = _records(500, seed=4)
    path = str(tmp_path / "s")
    write_store(path, records, samples_per_shard=200, progress=False)
    first = {f: os.path.getmtime(os.path.join(path, f)) for f in os.listdir(path)}
    want = [CaptionStore(path).texts(i) for i in range(500)]
    # Simulate a crash: the manifest was never written and the last shard is half written.
    os.remove(os.path.join(path, "manifest.json"))
    last = os.path.join(path, "shard-00002.lcs")
    os.truncate(last, os.path.getsize(last) // 2)
    write_store(path, records, samples_per_shard=200, progress=False)
    assert os.path.getmtime(os.path.join(path, "shard-00000.lcs")) == first["shard-00000.lcs"]
    assert os.path.getmtime(last) != first["shard-00002.lcs"]
    store = CaptionStore(path)
    assert all(len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
               for a, b in zip(want, (store.texts(i) for i in range(500))))
    assert not [f for f in os.listdir(path) if is_temp(f)]


def test_record_codec_carries_records_between_formats(store_dir):
    path, records = store_dir
    store = CaptionStore(path)
    codec = RecordCodec(store.dictionary)
    record = bytes(store.record(42))
    assert [t.tolist() for t in codec.decode(record)] == [t.tolist() for t in store.texts(42)]
    assert codec.encode(store.texts(42)) == record
    assert json.loads(open(os.path.join(path, "manifest.json")).read())["format_version"] == 2
    assert pad_tokens(np.array([5, 6], dtype=np.uint16))[:4].tolist() == [49406, 5, 6, 49407]


def test_bad_record_type_is_an_error(tmp_path):
    with pytest.raises(TypeError, match="list of texts"):
        write_store(str(tmp_path / "bad"), ["not a list"], progress=False)


def test_store_bytes_leaves_out_temporary_files(store_dir, tmp_path):
    """Temporary files (common/io.py's ".<name>.*.tmp": the shard writer's and the manifest's) do not count."""
    from loaders.caption_store import store_bytes
    path = str(tmp_path / "store")
    shutil.copytree(store_dir[0], path)
    before = store_bytes(path)
    assert before == sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    for name in (".shard-00003.lcs.k2v9x1.tmp", ".manifest.json.abc123.tmp"):
        with open(os.path.join(path, name), "wb") as f:
            f.write(b"x" * 1000)
    assert store_bytes(path) == before
