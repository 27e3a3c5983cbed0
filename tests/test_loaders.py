"""The three loaders (FFCV, DALI, torch) on one small real packed set (emoji, 3 shards), all on CPU.

One pack per session; FFCV Loaders are cached per shard and config inside the process, so numba compiles
each configuration once. The torch loader with num_workers=0 is the reference the others must equal.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from scipy import stats

from loaders import build_loader
from loaders.sampling import (EpochSampler, ShardTable, caption_weights, crop_box, draw_text_index, flip,
                              unread_ranges)
from loaders.caption_store import CaptionStore
from packing import builders
from packing.pack import PackConfig, PackError, pack

KINDS = ["torch", "ffcv", "dali"]
MAX_TEXTS = 5


@pytest.fixture(scope="session")
def store(packed):  # packed: conftest's 95 emoji images in shards of 40
    return CaptionStore(os.path.join(packed, "captions"))


def run(kind, root, **kw):
    """All batches of one epoch as dicts of tensors (copied: FFCV reuses its buffers)."""
    args = dict(batch_size=16, text_mode="rewrite", seed=3, epoch=0, num_workers=1, return_dict=True)
    args.update(kw)
    return [{k: v.clone() for k, v in b.items()} for b in build_loader(kind, root, **args)]


def cat(batches, key):
    return torch.cat([b[key] for b in batches])


# ------------------------------------------------------------------------------------ sampling (no I/O)

def test_sampler_epoch_is_a_permutation_split_over_ranks():
    shards = ShardTable.from_sizes([40, 40, 15])
    orders = []
    for epoch in range(3):
        parts = [np.concatenate(list(EpochSampler(shards, seed=1, epoch=epoch, batch_size=8, rank=r,
                                                  world_size=2, drop_last=False))) for r in range(2)]
        assert sorted(set(np.concatenate(parts))) == list(range(95))  # union = the set
        kept = [np.concatenate(list(EpochSampler(shards, seed=1, epoch=epoch, batch_size=8, rank=r,
                                                 world_size=2, drop_last=True))) for r in range(2)]
        assert not set(kept[0]) & set(kept[1])  # disjoint ranks
        orders.append(np.concatenate(parts))
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch
    # shard-level shuffle + in-shard order: one rank's reads change shard at most #shards times
    order = np.concatenate(list(EpochSampler(shards, seed=1, epoch=0, batch_size=8)))
    assert np.count_nonzero(np.diff(np.searchsorted([40, 80], order, side="right"))) <= 2


def test_sampler_resume_is_the_tail_of_the_epoch():
    shards = ShardTable.from_sizes([40, 40, 15])
    full = list(EpochSampler(shards, seed=5, epoch=2, batch_size=7, drop_last=False))
    tail = list(EpochSampler(shards, seed=5, epoch=2, batch_size=7, drop_last=False, start_batch=4))
    assert len(tail) == len(full) - 4
    assert all(np.array_equal(a, b) for a, b in zip(full[4:], tail))


def read_epoch_in_legs(sizes, legs, seed=4, epoch=1):
    """One epoch read in legs of (world size, micro batch, batches each rank reads; None: to the end),
    re-slicing what is left between legs as a resume at another world size does (training/elastic.py).
    Returns (every index read, in order; the first leg's whole drop_last set; what the last slicing
    dropped: its drop_last tail)."""
    shards = ShardTable.from_sizes(sizes)
    n, remaining, read = shards.num_samples, None, []
    first = [EpochSampler(shards, seed=seed, epoch=epoch, batch_size=legs[0][1], rank=r, world_size=legs[0][0])
             for r in range(legs[0][0])]
    for world, micro, batches in legs:
        ranks = [EpochSampler(shards, seed=seed, epoch=epoch, batch_size=micro, rank=r, world_size=world,
                              remaining=remaining) for r in range(world)]
        upto = ranks[0].num_batches if batches is None else batches
        assert upto <= ranks[0].num_batches
        read += [s.batch_indices(b) for s in ranks for b in range(upto)]
        left = ranks[0].num_samples_total - world * upto * micro  # the last leg's: its drop_last tail
        remaining = unread_ranges(n, remaining, world, micro, upto)
    return np.concatenate(read), np.concatenate([i for s in first for i in s]), left


@pytest.mark.parametrize("sizes, legs", [
    ([40, 40, 15], [(2, 4, 3), (1, 4, None)]),
    ([40, 40, 15], [(2, 4, 3), (1, 8, 2), (2, 4, None)]),  # 2 -> 1 -> 2 within one epoch, micro batch too
    ([40, 40, 15], [(2, 4, 0), (3, 5, None)]),  # nothing read yet
    ([7, 30, 13, 50], [(3, 4, 2), (2, 3, 1), (3, 4, 1), (1, 5, None)]),
    ([7, 30, 13, 50], [(4, 2, 11), (2, 2, None)]),  # the old ranks read their whole slices: nothing left
    ([101], [(5, 3, 4), (2, 6, 1), (5, 3, None)]),
])
def test_resize_mid_epoch_reads_the_rest_of_the_epoch_once(sizes, legs):
    read, whole, left = read_epoch_in_legs(sizes, legs)
    assert len(set(read.tolist())) == len(read)  # nothing twice
    assert set(read.tolist()) <= set(whole.tolist())  # nothing the first slicing had dropped
    assert len(whole) - len(read) == left  # nothing skipped but the last slicing's drop_last tail
    world, micro, _ = legs[-1]
    assert left < world * (micro + 1)


def test_sampler_over_the_whole_order_is_unchanged_and_ranges_are_checked():
    shards = ShardTable.from_sizes([40, 40, 15])
    for drop_last in (True, False):
        for r in range(3):
            kw = dict(seed=2, epoch=1, batch_size=6, rank=r, world_size=3, drop_last=drop_last, start_batch=1)
            assert all(np.array_equal(a, b) for a, b in zip(EpochSampler(shards, **kw),
                                                            EpochSampler(shards, remaining=[(0, 95)], **kw)))
    # positions map through the ranges: two ranges are one slice of 10 + 12 positions
    s = EpochSampler(shards, seed=2, epoch=1, batch_size=4, world_size=2, remaining=[(3, 13), (50, 64)])
    assert s.global_positions(0, 12).tolist() == [*range(3, 13), 50, 51] and s.contiguous_end(4) == 10
    for bad in ([(5, 3)], [(0, 10), (8, 20)], [(90, 96)]):
        with pytest.raises(ValueError, match="ordered, disjoint"):
            EpochSampler(shards, seed=2, epoch=1, batch_size=4, remaining=bad)


def test_crop_box_is_a_pure_function_of_seed_epoch_index_and_view():
    boxes = np.array([crop_box(3, 1, i, 200, 300, 0.5, 1.0, 3 / 4, 4 / 3) for i in range(4000)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 200).all() and (left + w <= 300).all()
    area = h * w / (200 * 300)
    assert area.min() > 0.49 and area.max() < 1.01 and 0.55 < area.mean() < 0.75  # big boxes miss more
    assert 0.74 < (w / h).min() and (w / h).max() < 1.35
    assert len({tuple(b) for b in boxes}) > 3900  # a different box per sample
    # the same for any integer types (FFCV passes uint32 sizes and uint64 indices) and on every call
    assert crop_box(np.int64(3), np.int64(1), np.uint64(7), np.uint32(200), np.uint32(300),
                    0.5, 1.0, 3 / 4, 4 / 3) == tuple(boxes[7])
    # other epoch, seed or view: another box
    assert crop_box(3, 2, 7, 200, 300, 0.5, 1.0, 3 / 4, 4 / 3) != tuple(boxes[7])
    assert crop_box(4, 1, 7, 200, 300, 0.5, 1.0, 3 / 4, 4 / 3) != tuple(boxes[7])
    assert crop_box(3, 1, 7, 200, 300, 0.5, 1.0, 3 / 4, 4 / 3, 1) != tuple(boxes[7])
    # no box fits a 10 x 1000 strip at 90 % of its area: centre crop at the widest allowed ratio
    assert crop_box(0, 0, 0, 10, 1000, 0.9, 1.0, 3 / 4, 4 / 3) == (0, 493, 10, 13)


def test_flip_is_a_fair_coin_independent_of_the_crop_and_caption_draws():
    flips = np.array([flip(3, 1, i) for i in range(4000)])
    assert abs(flips.mean() - 0.5) < 0.04
    assert flips.tolist() == [flip(3, 1, i) for i in range(4000)]
    assert (flips != np.array([flip(3, 1, i, 1) for i in range(4000)])).mean() > 0.4  # views independent
    tops = np.array([crop_box(3, 1, i, 200, 300, 0.5, 1.0, 3 / 4, 4 / 3)[0] for i in range(4000)])
    texts = np.asarray(draw_text_index(3, 1, np.arange(4000), 2))
    for other in (tops % 2, texts):
        assert stats.chi2_contingency(np.histogram2d(flips, other, bins=2)[0])[1] > 1e-3


# ------------------------------------------------------------------------------------ loaders

@pytest.fixture(scope="session")
def reference(packed):
    return run("torch", packed, num_workers=0, drop_last=False)


@pytest.mark.parametrize("kind", ["torch", pytest.param("ffcv", marks=pytest.mark.slow), "dali"])  # ffcv: 5.2 s
def test_epoch_covers_the_set_and_matches_the_reference(kind, packed, reference):
    batches = run(kind, packed, drop_last=False, num_workers=2)
    index = cat(batches, "index")
    assert sorted(index.tolist()) == list(range(95))
    assert torch.equal(index, cat(reference, "index"))
    assert torch.equal(cat(batches, "tokens"), cat(reference, "tokens"))  # same texts, any worker count
    images = cat(batches, "images")
    assert images.shape == (95, 3, 224, 224) and images.dtype == torch.float32
    assert -2.5 < images.mean() < 2.5 and 0.2 < images.std() < 2.5


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_read_disjoint_parts_whose_union_is_the_set(kind, packed):
    parts = [cat(run(kind, packed, rank=r, world_size=2, drop_last=True, epoch=1), "index") for r in range(2)]
    assert not set(parts[0].tolist()) & set(parts[1].tolist())
    full = [cat(run(kind, packed, rank=r, world_size=2, drop_last=False, epoch=1), "index") for r in range(2)]
    assert set(full[0].tolist()) | set(full[1].tolist()) == set(range(95))


@pytest.mark.parametrize("kind", KINDS)
def test_resume_mid_epoch_continues_with_the_next_unseen_batch(kind, packed):
    full = run(kind, packed, epoch=2, batch_size=8)
    tail = run(kind, packed, epoch=2, batch_size=8, start_batch=5)
    assert len(tail) == len(full) - 5
    for a, b in zip(full[5:], tail):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["tokens"], b["tokens"])


@pytest.mark.parametrize("kind", KINDS)
def test_every_loader_reads_the_same_remaining_ranges(kind, packed):
    """What is left of an epoch after 3 batches of 4 on 2 ranks, re-sliced for 1 rank in batches of 5: its
    positions jump from one range to the next inside a shard visit and inside a batch (FFCV's runs must
    stop there); every loader reads the sampler's indices."""
    remaining = tuple(unread_ranges(95, None, 2, 4, 3))
    want = EpochSampler(ShardTable.from_meta(json.load(open(os.path.join(packed, "meta.json")))), seed=3,
                        epoch=1, batch_size=5, remaining=remaining)
    assert remaining == ((12, 44), (59, 91)) and want.contiguous_end(0) == 32
    assert 44 < want.visit_ends[np.searchsorted(want.visit_ends, 43, side="right")]  # the jump is inside a visit
    got = run(kind, packed, batch_size=5, epoch=1, remaining=remaining)
    assert torch.equal(cat(got, "index"), torch.from_numpy(np.concatenate(list(want))))


# Four loaders each (torch 5.7 s, FFCV about 20 s with its numba pipelines, on 2 cores): slow.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torch", "ffcv"])
def test_same_seed_gives_bit_identical_batches_for_any_worker_count_and_on_resume(kind, packed):
    """Crops, SLIP views and texts are functions of (seed, epoch, index): FFCV's own crop decoder drew
    from numba's global generator, so two same-seed runs differed from the first batch."""
    args = dict(epoch=4, batch_size=8, slip_views=True)
    first, second = run(kind, packed, num_workers=1, **args), run(kind, packed, num_workers=2, **args)
    resumed = run(kind, packed, num_workers=1, start_batch=5, **args)
    keys = ("images", "view1", "view2", "tokens", "index")
    assert len(first) == len(second) == len(resumed) + 5 == 11
    for a, b in zip(first, second):
        assert all(torch.equal(a[k], b[k]) for k in keys)
    for a, b in zip(first[5:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in keys)
    other_epoch = run(kind, packed, num_workers=1, **{**args, "epoch": 5})
    assert not torch.equal(first[0]["images"], other_epoch[0]["images"])


@pytest.mark.parametrize("kind", KINDS)
def test_all_texts_mode_returns_every_text_with_mask(kind, packed, store):
    batches = run(kind, packed, text_mode="all", max_texts=MAX_TEXTS, drop_last=False)
    tokens, mask, index = cat(batches, "tokens"), cat(batches, "mask"), cat(batches, "index")
    assert tokens.shape == (95, MAX_TEXTS, 77) and mask.dtype == torch.bool
    for row, i in enumerate(index.tolist()):
        want, want_mask = store.all_texts(i, MAX_TEXTS)
        assert torch.equal(tokens[row], torch.from_numpy(want)) and torch.equal(mask[row], torch.from_numpy(want_mask))
    assert sorted(set(mask.sum(1).tolist())) == [1, 2, 3, 4, 5]  # samples without rewrites keep 1


@pytest.mark.parametrize("kind", ["ffcv", "dali"])
def test_original_mode_is_text_slot_zero(kind, packed, store):
    batches = run(kind, packed, text_mode="original", drop_last=False)
    for row, i in zip(cat(batches, "tokens"), cat(batches, "index").tolist()):
        assert torch.equal(row, torch.from_numpy(store.all_texts(i, 1)[0][0]))


def test_text_draw_is_uniform_and_follows_draw_text_index(packed, store):
    """Chi-square over 24 epochs of FFCV draws: each sample's chosen slot, pooled by its text count."""
    counts = {n: np.zeros(n) for n in range(2, 6)}
    for epoch in range(24):
        batches = run("ffcv", packed, epoch=epoch, drop_last=False)
        for row, i in zip(cat(batches, "tokens").numpy(), cat(batches, "index").tolist()):
            texts, mask = store.all_texts(i, MAX_TEXTS)
            n = int(mask.sum())
            k = [j for j in range(n) if np.array_equal(texts[j], row)]
            assert k == [draw_text_index(3, epoch, i, n)]  # sampling's draw, exactly
            if n > 1:
                counts[n][k[0]] += 1
    for n, c in counts.items():
        assert stats.chisquare(c).pvalue > 1e-3, (n, c)


# ------------------------------------------------------------------------------------ weighted caption draw

WEIGHTS = dict(p_original=0.4, style_weights=[3.0, 1.0, 0.0, 2.0])  # rewrite 3 is never drawn


def weighted_probabilities(n: int, p_original: float, style_weights: list) -> np.ndarray:
    """The draw's definition for a sample with n texts: the original with probability p (1 when no
    rewrite it has weighs anything), rewrite j in proportion to its weight among the sample's rewrites."""
    w = np.array(style_weights[:n - 1], dtype=float)
    if w.sum() == 0:
        return np.eye(n)[0]
    return np.concatenate([[p_original], (1 - p_original) * w / w.sum()])


def test_weighted_draw_follows_its_weights_and_uniform_is_unchanged():
    weights = caption_weights(**WEIGHTS)
    index = np.arange(60_000)
    for n in (2, 3, 5, 7):  # 7: rewrites past the listed styles weigh 1
        draws = draw_text_index(3, 1, index, n, weights)
        assert draws.tolist()[:200] == [draw_text_index(3, 1, int(i), n, weights) for i in range(200)]
        style = WEIGHTS["style_weights"] + [1.0] * (n - 1 - len(WEIGHTS["style_weights"]))
        expected = weighted_probabilities(n, WEIGHTS["p_original"], style) * len(index)
        counts = np.bincount(draws, minlength=n)
        assert counts[expected == 0].sum() == 0, (n, counts)
        assert stats.chisquare(counts[expected > 0], expected[expected > 0]).pvalue > 1e-3, (n, counts)
    assert (draw_text_index(3, 1, index, 1, weights) == 0).all()
    # without p_original the original weighs 1 like an unweighted style; named styles are positions
    named = caption_weights(style_weights={"chatbot_b": 0.0, "human": 4.0})
    assert named.tolist() == [-1.0, 1.0, 0.0, 1.0, 4.0]
    counts = np.bincount(draw_text_index(0, 0, index, 5, named), minlength=5)
    expected = np.array([1, 1, 0, 1, 4]) / 7 * len(index)
    assert counts[2] == 0 and stats.chisquare(counts[expected > 0], expected[expected > 0]).pvalue > 1e-3
    # the default is the uniform draw, exactly
    assert np.array_equal(draw_text_index(5, 2, index, 4, caption_weights()), draw_text_index(5, 2, index, 4))
    assert np.array_equal(draw_text_index(5, 2, index[:300], 4), [draw_text_index(5, 2, int(i), 4) for i in range(300)])
    with pytest.raises(ValueError, match="unknown styles"):
        caption_weights(style_weights={"haiku": 1.0})
    with pytest.raises(ValueError, match="p_original"):
        caption_weights(p_original=1.5)


@pytest.mark.slow  # every loader twice: 7 s on 2 cores
def test_weighted_draw_is_identical_in_every_loader_and_on_resume(packed, store):
    ref = run("torch", packed, num_workers=0, drop_last=False, **WEIGHTS)
    index = cat(ref, "index").tolist()
    for row, i in zip(cat(ref, "tokens").numpy(), index):
        texts, mask = store.all_texts(i, MAX_TEXTS)
        n = int(mask.sum())
        k = [j for j in range(n) if np.array_equal(texts[j], row)]
        assert k == [draw_text_index(3, 0, i, n, caption_weights(**WEIGHTS))]
    for kind in ("ffcv", "dali"):
        other = run(kind, packed, drop_last=False, **WEIGHTS)
        assert torch.equal(cat(other, "index"), cat(ref, "index")), kind
        assert torch.equal(cat(other, "tokens"), cat(ref, "tokens")), kind
    tail = run("torch", packed, num_workers=0, drop_last=False, start_batch=2, **WEIGHTS)
    assert torch.equal(cat(tail, "tokens"), cat(ref[2:], "tokens"))
    uniform = run("torch", packed, num_workers=0, drop_last=False)
    assert not torch.equal(cat(uniform, "tokens"), cat(ref, "tokens"))


STYLES = ["chatbot_a", "chatbot_b", "coco", "human"]


@pytest.fixture(scope="session")
def styled(tmp_path_factory):
    """36 emoji with one rewrite per style, packed with a fidelity filter that drops every third sample's
    chatbot_a rewrite: in those records the later rewrites move up one position."""
    root = tmp_path_factory.mktemp("styled")
    folder = builders.build_dataset("emoji", str(root / "emoji"), max_samples=36, workers=1)
    with open(os.path.join(folder, "captions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    expected = {}
    with open(root / "rewrites.jsonl", "w") as f:
        for i, row in enumerate(rows):
            texts = [f"{style} says {row['caption'].lower()}" for style in STYLES]
            scores = [0.1 if i % 3 == 0 and style == "chatbot_a" else 0.9 for style in STYLES]
            f.write(json.dumps({"key": row["key"], "rewrites": texts, "scores": scores, "styles": STYLES}) + "\n")
            expected[row["key"]] = [None] + [s for s, score in zip(STYLES, scores) if score >= 0.5]
    out = str(root / "packed")
    pack(PackConfig(input=folder, out=out, rewrites=str(root / "rewrites.jsonl"), samples_per_shard=16,
                    min_fidelity=0.5, workers=1))
    return {"out": out, "expected": expected}


@pytest.mark.slow  # packs a filtered set first: 7 s on 2 cores
def test_packed_texts_carry_their_style_after_a_drop(styled):
    """Style weights by name mean the style whatever was dropped before it: weight only chatbot_b and
    every loader draws the chatbot_b text of every sample, also where the filter dropped chatbot_a (a
    weight by position would land on coco there)."""
    out = styled["out"]
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    assert meta["format_version"] == 2 and meta["styles"] == STYLES
    with open(os.path.join(out, "keys.txt")) as f:
        keys = f.read().split()
    store = CaptionStore(os.path.join(out, "captions"))
    assert [store.text_styles(i) for i in range(len(keys))] == [styled["expected"][k] for k in keys]
    shifted = sum(1 for k in keys if styled["expected"][k][1] != "chatbot_a")
    assert shifted >= 10  # (of the 36 emoji drawn, the build may skip one that does not render)
    assert meta["text_counts"]["per_style"] == {s: len(keys) - shifted * (s == "chatbot_a") for s in STYLES}
    weights = dict(p_original=0.0, style_weights={"chatbot_a": 0.0, "chatbot_b": 1.0, "coco": 0.0, "human": 0.0})
    ref = run("torch", out, num_workers=0, drop_last=False, **weights)
    for row, i in zip(cat(ref, "tokens").numpy(), cat(ref, "index").tolist()):
        texts, mask = store.all_texts(i, MAX_TEXTS)
        assert np.array_equal(row, texts[store.text_styles(i).index("chatbot_b")])
    for kind in ("ffcv", "dali"):
        other = run(kind, out, drop_last=False, **weights)
        assert torch.equal(cat(other, "index"), cat(ref, "index")) and torch.equal(
            cat(other, "tokens"), cat(ref, "tokens")), kind


def test_records_without_styles_read_as_before():
    """A format-1 record (no style byte) decodes to the same texts, every style 'none', and its rewrites
    weigh by position, as they did."""
    from loaders.caption_codec import RecordCodec, record_styles
    codec = RecordCodec()
    texts = [np.array([5, 6, 7], np.uint16), np.array([8], np.uint16), np.array([9, 10], np.uint16)]
    old, new = codec.encode(texts), codec.encode(texts, [0, 3, 1])
    for record in (old, new):
        assert [t.tolist() for t in codec.decode(record)] == [t.tolist() for t in texts]
    assert record_styles(codec.decompress(old)) == [-1, -1, -1]
    assert record_styles(codec.decompress(new)) == [-1, 2, 0]
    weights = caption_weights(0.0, [0.0, 1.0])  # by position: always the second rewrite
    assert draw_text_index(0, 0, 11, 3, weights, [-1, -1, -1]) == draw_text_index(0, 0, 11, 3, weights) == 2
    assert draw_text_index(0, 0, 11, 3, weights, [-1, 1, 0]) == 1  # by style: rewrite 1 is style 1


@pytest.mark.slow  # three loaders over the set: 7 s on 2 cores
def test_image_matches_its_index_across_loaders(packed):
    """Center crops (no augmentation) of the same index agree between decoders and resizers; so do the
    random crops of FFCV and torch, which draw the same box for a (seed, epoch, index)."""
    ref = run("torch", packed, augment=False, num_workers=0)[0]
    for kind in ("ffcv", "dali"):
        other = run(kind, packed, augment=False)[0]
        assert torch.equal(other["index"], ref["index"])
        diff = (other["images"] - ref["images"]).abs().flatten(1).mean(1)
        assert diff.max() < 0.05, (kind, diff.max())
    ref, ffcv = run("torch", packed, num_workers=0)[0], run("ffcv", packed)[0]
    diff = (ffcv["images"] - ref["images"]).abs().flatten(1).mean(1)
    assert torch.equal(ffcv["index"], ref["index"]) and diff.max() < 0.05, diff.max()


# ffcv 8 s, dali 5.3 s on 2 cores
@pytest.mark.parametrize("kind", ["torch", pytest.param("ffcv", marks=pytest.mark.slow),
                                  pytest.param("dali", marks=pytest.mark.slow)])
def test_slip_views(kind, packed):
    batch = run(kind, packed, slip_views=True)[0]
    for key in ("images", "view1", "view2"):
        assert batch[key].shape == (16, 3, 224, 224) and batch[key].dtype == torch.float32
    assert not torch.equal(batch["view1"], batch["view2"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("victim", ["ffcv/part-00001.beton", "dali/part-00001.tar"])
def test_truncated_pack_file_gives_a_clear_error(kind, victim, packed, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    path = copy / victim
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(PackError, match="part-00001"):  # checked against meta.json's sizes
        run(kind, str(copy))


def test_truncated_files_are_caught_by_their_own_structure(packed, tmp_path):
    """Even when meta.json's recorded sizes are gone, the .beton and tar checks name the file."""
    from loaders.ffcv_loader import check_beton
    from loaders.packed import parse_tar_index

    beton, tar = tmp_path / "a.beton", tmp_path / "a.tar"
    shutil.copy(os.path.join(packed, "ffcv/part-00000.beton"), beton)
    shutil.copy(os.path.join(packed, "dali/part-00000.tar"), tar)
    shutil.copy(os.path.join(packed, "dali/part-00000.idx"), tmp_path / "a.idx")
    check_beton(beton, 40)
    parse_tar_index(tmp_path / "a.idx", tar, 40)
    for path in (beton, tar):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(PackError, match="a.beton.*truncated"):
        check_beton(beton, 40)
    with pytest.raises(PackError, match="a.tar.*truncated"):
        parse_tar_index(tmp_path / "a.idx", tar, 40)


def test_corrupted_caption_record_in_beton_names_the_sample(packed, tmp_path):
    """A flipped byte inside a compressed record fails the zstd checksum in the compiled decoder."""
    from ffcv.reader import Reader

    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    beton = copy / "ffcv/part-00000.beton"
    reader = Reader(str(beton))
    row = reader.metadata[7]
    ptr, size = int(row["f1"]["ptr"]), int(row["f1"]["size"])  # field 1 = "record"
    with open(beton, "r+b") as f:
        f.seek(ptr + size // 2)
        byte = f.read(1)
        f.seek(ptr + size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(PackError,
                       match=r"part-00000\.beton: sample 7 \(key emoji-\w+\): caption record does not decompress"):
        run("ffcv", str(copy), drop_last=False)
