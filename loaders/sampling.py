"""Per-epoch sample order shared by the FFCV, DALI and torch loaders.

The order of an epoch is a function of (seed, epoch) only:
  1. the shards are shuffled (shard-level shuffle), then
  2. the samples of each shard are visited in a random order of their own (in-shard shuffle),
so a reader walks one shard at a time and reads from object stores or network disks stay mostly
sequential. Rank r of W takes the contiguous slice [r*L, (r+1)*L) of that virtual order, so each rank
touches few shards and the ranks' slices are disjoint; their union is the whole set (with
drop_last=False the last rank's slice wraps round to the start, like torch's DistributedSampler pads).

`remaining` narrows the epoch to some (start, stop) ranges of that order (default: all of it, [(0, N)]):
the slices are then cut the same way from the ranges' concatenation. A resume at another world size
mid-epoch (training/elastic.py) hands the new ranks what the old ones left unread, so the epoch reads
each sample once. A rank's global positions are then contiguous only up to a range end
(`contiguous_end`): readers that walk runs of positions stop there too.

Nothing of size N is ever materialised: the shard permutation is O(#shards) and a shard's in-shard
permutation is recomputed (and cached) when the reader enters it, so memory does not grow with the
dataset (LAION-400M is fine). `start_batch` resumes mid-epoch: batch b of a rank is positions
[b*B, (b+1)*B) of its slice, whatever happened before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numba
import numpy as np


def _rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    # SeedSequence mixes the whole tuple, so (seed, epoch) and (seed, epoch, shard) streams are independent.
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), *map(int, more)]))


@dataclass(frozen=True)
class ShardTable:
    """Shard sizes and first global indices, in pack order (meta.json's "shards")."""

    sizes: np.ndarray  # int64 [S]
    first_index: np.ndarray  # int64 [S]

    @classmethod
    def from_meta(cls, meta: dict) -> "ShardTable":
        shards = meta["shards"]
        return cls(np.array([s["num_samples"] for s in shards], dtype=np.int64),
                   np.array([s["first_index"] for s in shards], dtype=np.int64))

    @classmethod
    def from_sizes(cls, sizes: Sequence[int]) -> "ShardTable":
        sizes = np.asarray(sizes, dtype=np.int64)
        return cls(sizes, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))

    @property
    def num_samples(self) -> int:
        return int(self.sizes.sum())


class EpochSampler:
    """The global indices one rank reads in one epoch, in order, batch by batch."""

    def __init__(self, shards: ShardTable, *, seed: int, epoch: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, start_batch: int = 0,
                 remaining: Sequence[tuple[int, int]] | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if shards.num_samples == 0:
            raise ValueError("empty dataset: no samples to load")
        self.shards, self.seed, self.epoch = shards, int(seed), int(epoch)
        self.batch_size, self.drop_last = int(batch_size), bool(drop_last)
        self.ranges = check_ranges(remaining, shards.num_samples)  # int64 [R, 2]
        self.range_ends = np.cumsum(self.ranges[:, 1] - self.ranges[:, 0])  # in the concatenation
        n = self.num_samples_total = int(self.range_ends[-1]) if len(self.ranges) else 0
        if n == 0:
            raise ValueError("no samples left to load (empty `remaining`)")
        # Per-rank slice length: floor (drop_last) or ceil with wrap-round padding.
        self.per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        self.offset = rank * self.per_rank
        if drop_last:
            self.num_batches = self.per_rank // self.batch_size
        else:
            self.num_batches = math.ceil(self.per_rank / self.batch_size)
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.num_batches}]")
        self.start_batch = int(start_batch)
        # Shard-level shuffle: order[k] = pack index of the k-th shard visited this epoch.
        self.shard_order = _rng(seed, epoch).permutation(len(shards.sizes))
        self.visit_ends = np.cumsum(shards.sizes[self.shard_order])  # end position of each visited shard
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Batches left from start_batch to the end of the epoch."""
        return self.num_batches - self.start_batch

    def _shard_perm(self, shard: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != shard:
            size = int(self.shards.sizes[shard])
            perm = _rng(self.seed, self.epoch, 1 + shard).permutation(size)
            self._cached = (shard, perm + self.shards.first_index[shard])
        return self._cached[1]

    def global_positions(self, start: int, stop: int) -> np.ndarray:
        """Positions in the epoch's virtual order of this rank's slice [start, stop)."""
        at = (self.offset + np.arange(start, stop, dtype=np.int64)) % self.num_samples_total
        k = np.searchsorted(self.range_ends, at, side="right")
        return self.ranges[k, 0] + at - (self.range_ends[k] - (self.ranges[k, 1] - self.ranges[k, 0]))

    def contiguous_end(self, start: int) -> int:
        """The rank-local position where the run of consecutive global positions from `start` ends (the
        end of its range of `remaining`, or the wrap-round to the order's start)."""
        at = (self.offset + start) % self.num_samples_total
        return start + int(self.range_ends[np.searchsorted(self.range_ends, at, side="right")]) - at

    def indices(self, start: int, stop: int) -> np.ndarray:
        """Global sample indices at rank-local positions [start, stop) (vectorised per shard)."""
        pos = self.global_positions(start, stop)
        visit = np.searchsorted(self.visit_ends, pos, side="right")
        out = np.empty(len(pos), dtype=np.int64)
        for v in np.unique(visit):  # usually one or two shards per batch
            sel = visit == v
            begin = self.visit_ends[v] - self.shards.sizes[self.shard_order[v]]
            out[sel] = self._shard_perm(int(self.shard_order[v]))[pos[sel] - begin]
        return out

    def batch_bounds(self, b: int) -> tuple[int, int]:
        start = b * self.batch_size
        return start, min(start + self.batch_size, self.per_rank)

    def batch_indices(self, b: int) -> np.ndarray:
        return self.indices(*self.batch_bounds(b))

    def __iter__(self) -> Iterator[np.ndarray]:
        for b in range(self.start_batch, self.num_batches):
            yield self.batch_indices(b)

    def positions_left(self) -> int:
        """Samples this rank still reads from start_batch on."""
        if self.num_batches == self.start_batch:
            return 0
        return self.batch_bounds(self.num_batches - 1)[1] - self.start_batch * self.batch_size


def check_ranges(remaining, n: int) -> np.ndarray:
    """`remaining` as int64 [R, 2] of non-empty, ordered, disjoint ranges within [0, n) (None: [(0, n)])."""
    if remaining is None:
        return np.array([[0, n]], dtype=np.int64)
    ranges = np.asarray(remaining, dtype=np.int64).reshape(-1, 2)
    starts, stops = ranges[:, 0], ranges[:, 1]
    if len(ranges) and ((starts >= stops).any() or starts[0] < 0 or stops[-1] > n or (starts[1:] < stops[:-1]).any()):
        raise ValueError(f"remaining {ranges.tolist()}: ordered, disjoint, non-empty ranges within [0, {n})")
    return ranges


def cut_ranges(ranges: np.ndarray, lo: int, hi: int) -> list[tuple[int, int]]:
    """The global-position ranges of positions [lo, hi) of the concatenation of `ranges`."""
    out = []
    begin = 0
    for a, b in ranges.tolist():
        end = begin + b - a
        s, e = max(lo, begin), min(hi, end)
        if s < e:
            out.append((a + s - begin, a + e - begin))
        begin = end
    return out


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """Ranges with adjacent neighbours joined ((0, 4), (4, 9) -> (0, 9))."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((int(a), int(b)))
    return out


def unread_ranges(n: int, remaining, world_size: int, batch_size: int, batches_read: int) -> list[tuple[int, int]]:
    """What `world_size` drop_last ranks, each `batches_read` batches into their slice of `remaining`
    (None: the whole order of n), have still to read this epoch, as `remaining` for a new slicing: every
    rank's unread positions, rank after rank. The epoch's sample set is the first slicing's (remaining
    None): what it drops (the floor remainder after the last slice, each slice's part batch) stays out.
    A later slicing's remaining holds only samples of that set, so what it has not read goes on, tail
    included: only the epoch's last slicing drops its own tail."""
    ranges = check_ranges(remaining, n)
    total = int((ranges[:, 1] - ranges[:, 0]).sum())
    per_rank = total // world_size
    if remaining is None:  # drop_last: a rank reads up to the end of its last whole batch
        ends = [r * per_rank + per_rank // batch_size * batch_size for r in range(world_size)]
    else:
        ends = [(r + 1) * per_rank for r in range(world_size - 1)] + [total]
    tails = [cut_ranges(ranges, r * per_rank + batches_read * batch_size, end) for r, end in enumerate(ends)]
    return merge_ranges(part for tail in tails for part in tail)


# ---------------------------------------------------------------------------------------------------
# Per-sample draws: caption, crop box and flip as pure functions of (seed, epoch, index[, view]).
#
# Every draw hashes (seed, epoch, index) with splitmix64's finaliser. The caption draw takes that hash
# modulo the sample's text count (weighted: as a uniform in [0, 1) over the cumulative weights); the crop, flip and
# SLIP colour draws mix in a salt, so their streams
# are independent of it and of each other, and a view number, so SLIP's two views (and the main image,
# view 0) get independent crops. They are numba-compiled, so the same code serves Python callers (torch
# loader), FFCV's compiled ops and numba code in a DALI pipeline; every loader, worker count and resumed
# run therefore draws sample i of an epoch the same way.

_MIX_1, _MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN_64 = np.uint64(0x9E3779B97F4A7C15)
CROP_SALT = np.uint64(0x43524F50)  # "CROP"
FLIP_SALT = np.uint64(0x464C4950)  # "FLIP"
SIMCLR_SALT = np.uint64(0x53494D43)  # "SIMC": SLIP's colour jitter, grayscale and blur


def splitmix64(z):
    """splitmix64's finaliser: a bijection on uint64 whose outputs look independent.

    The one source of the mix: plain Python, so it runs on numpy uint64 arrays as it is (they wrap
    silently) and every compiled user gets its own numba dispatcher of it."""
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


_mix = numba.njit(nogil=True)(splitmix64)


def _text_hash(mix):
    """The per-sample hash the caption draw uses (sample_stream's too), written once: with
    mix=splitmix64 it runs on uint64 arrays, with mix a numba dispatcher it compiles."""
    def text_hash(seed, epoch, index):
        key = mix(np.uint64(seed) * _GOLDEN_64 + np.uint64(epoch))
        return mix(key ^ (np.uint64(index) * _GOLDEN_64))

    return text_hash


def style_weight(weights, styles, j):
    """Weight of rewrite j (text j + 1) in the caption draw: that of its style, weights[1 + styles[1 + j]]
    (a style id >= 0, loaders/caption_codec.py), else that of its position, weights[1 + j]; 1.0 past the end."""
    w = 1 + j
    if 1 + j < styles.shape[0] and styles[1 + j] >= 0:
        w = 1 + styles[1 + j]
    return weights[w] if w < weights.shape[0] else 1.0


def _draw_from(text_hash, weight):
    """The caption draw over a compiled text_hash and style_weight (one source for every pipeline's
    dispatcher)."""
    def draw(seed, epoch, index, n_texts, weights, styles):
        """Text number (0 = original) of one sample with n_texts texts. weights empty: uniform, h mod n.
        Else weights = caption_weights(...): the original with probability weights[0] (when >= 0; else it
        weighs 1 like a style), rewrite j (text j + 1) in proportion to the weight of its style,
        weights[1 + styles[1 + j]] (styles: int64 style id of each text, -1 or absent = none: then
        weights[1 + j], its position's), 1.0 past the end; renormalised over the texts this sample has;
        one uniform from the same hash picks."""
        h = text_hash(seed, epoch, index)
        if weights.shape[0] == 0 or n_texts <= 1:
            return np.int64(h % np.uint64(max(n_texts, 1)))
        u = np.float64(h >> np.uint64(11)) * (1.0 / 9007199254740992.0)
        total = 0.0
        for j in range(n_texts - 1):
            total += weight(weights, styles, j)
        p = weights[0]
        if p < 0.0:  # no probability of its own: the original weighs 1, like an unweighted style
            target = u * (1.0 + total)
            if target < 1.0:
                return np.int64(0)
            target -= 1.0
        else:
            if total <= 0.0 or u < p:
                return np.int64(0)
            target = (u - p) / (1.0 - p) * total
        last, acc = np.int64(0), 0.0
        for j in range(n_texts - 1):
            w = weight(weights, styles, j)
            if w > 0.0:
                acc += w
                last = np.int64(1 + j)
                if target < acc:
                    return last
        return last  # (rounding: target within an ulp of the total)

    return draw


def compiled_text_draw():
    """A compiled caption draw (seed, epoch, index, n_texts, weights) -> text number, with numba
    dispatchers of its own (mix and hash included).

    Each compiled pipeline (FFCV's decoder, DALI's operator) takes its own: numba once hung an FFCV
    epoch when DALI had compiled a dispatcher they shared first."""
    jit = numba.njit(nogil=True)
    return jit(_draw_from(jit(_text_hash(jit(splitmix64))), jit(style_weight)))


UNIFORM = np.zeros(0, dtype=np.float64)  # caption_weights() of the default: every text alike
NO_STYLES = np.zeros(0, dtype=np.int64)  # text styles unknown: rewrites weigh by position
_hash_array = _text_hash(splitmix64)
_sample_hash = numba.njit(nogil=True)(_text_hash(_mix))
_draw_one = compiled_text_draw()


@numba.njit(nogil=True)
def _draw_each(seed, epoch, indices, n_texts, weights, styles):
    out = np.empty(indices.shape[0], dtype=np.int64)
    for i in range(indices.shape[0]):
        # styles: one row per sample, or a single empty row (no styles: by position)
        out[i] = _draw_one(seed, epoch, indices[i], n_texts[i], weights, styles[i if styles.shape[0] > 1 else 0])
    return out


def caption_weights(p_original: float | None = None, style_weights=None, styles=None) -> np.ndarray:
    """float64 [1 + S] for the compiled draw: [p_original or -1, weight of rewrite 1, ..., rewrite S];
    empty (UNIFORM) when neither is given, which is exactly the uniform draw.

    style_weights: {style name: weight} over `styles` (default rewrite.pools.DEFAULT_POOLS, the order in
    which a sample's rewrites are stored; an unnamed style weighs 1), or weights by rewrite position."""
    if p_original is None and style_weights is None:
        return UNIFORM
    if p_original is not None and not 0.0 <= float(p_original) <= 1.0:
        raise ValueError(f"p_original {p_original!r}: a probability in [0, 1]")
    if isinstance(style_weights, dict):
        if styles is None:
            from rewrite.pools import DEFAULT_POOLS as styles
        unknown = set(style_weights) - set(styles)
        if unknown:
            raise ValueError(f"style_weights: unknown styles {sorted(unknown)} (rewrites are stored in the "
                             f"order {list(styles)})")
        style_weights = [float(style_weights.get(name, 1.0)) for name in styles]
    weights = [float(w) for w in (style_weights or ())]
    if any(not w >= 0.0 or w == float("inf") for w in weights):
        raise ValueError(f"style_weights {weights}: weights must be finite and >= 0")
    return np.array([-1.0 if p_original is None else float(p_original), *weights], dtype=np.float64)


def _u64(x) -> np.ndarray:
    # 1-d arrays throughout: numpy wraps uint64 arithmetic silently on arrays (on scalars it warns).
    return np.atleast_1d(np.asarray(x, dtype=np.uint64))


def draw_text_index(seed, epoch, sample_index, n_texts, weights=UNIFORM, styles=None):
    """Which text (0 = original) a sample shows in an epoch. Arrays broadcast; scalars give an int.
    weights: caption_weights(...) (default: uniform over the sample's texts). styles: the style id of each
    text (-1 = none; loaders/caption_codec.py record_styles), [n_texts] for one sample, [samples, max texts] for
    arrays; None: rewrites weigh by position.

    Depends only on its arguments, so every loader, worker count and resumed run draws the same text.
    """
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if np.ndim(sample_index) == 0 and np.ndim(n_texts) == 0:
        row = NO_STYLES if styles is None else np.ascontiguousarray(styles, dtype=np.int64)
        return int(_draw_one(int(seed), int(epoch), int(sample_index), int(n_texts), weights, row))
    if len(weights) == 0:  # vectorised in numpy
        h = _hash_array(_u64(seed), _u64(epoch), _u64(sample_index))
        return (h % np.maximum(_u64(n_texts), np.uint64(1))).astype(np.int64)
    index, n = np.broadcast_arrays(np.asarray(sample_index, dtype=np.int64), np.asarray(n_texts, dtype=np.int64))
    table = (np.zeros((1, 0), np.int64) if styles is None else
             np.ascontiguousarray(np.asarray(styles, dtype=np.int64).reshape(index.size, -1)))
    return _draw_each(int(seed), int(epoch), np.ascontiguousarray(index.ravel()), np.ascontiguousarray(n.ravel()),
                      weights, table).reshape(index.shape)


@numba.njit(nogil=True)
def sample_stream(seed, epoch, index, salt, view):
    """A uint64 key for one (seed, epoch, sample, purpose, view); draws then hash (key, k)."""
    sample_key = _sample_hash(seed, epoch, index)
    return _mix(_mix(sample_key ^ (np.uint64(salt) * _GOLDEN_64)) + np.uint64(view) * _GOLDEN_64)


@numba.njit(nogil=True)
def uniform(key, k):
    """The k-th uniform float in [0, 1) of stream `key` (53 random bits)."""
    return np.float64(_mix(key + np.uint64(k + 1) * _GOLDEN_64) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(nogil=True)
def crop_box(seed, epoch, index, height, width, scale_lo, scale_hi, ratio_lo, ratio_hi, view=0):
    """torchvision RandomResizedCrop.get_params for one sample: (top, left, h, w).

    Ten tries of (area fraction in [scale_lo, scale_hi], log-uniform aspect in [ratio_lo, ratio_hi]);
    the first box that fits wins, else a centre crop clamped to the ratio range."""
    key = sample_stream(seed, epoch, index, CROP_SALT, view)
    area = float(height) * float(width)
    log_lo, log_hi = np.log(ratio_lo), np.log(ratio_hi)
    for attempt in range(10):
        target = area * (scale_lo + (scale_hi - scale_lo) * uniform(key, 4 * attempt))
        aspect = np.exp(log_lo + (log_hi - log_lo) * uniform(key, 4 * attempt + 1))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniform(key, 4 * attempt + 2) * (height - h + 1))
            left = int(uniform(key, 4 * attempt + 3) * (width - w + 1))
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < ratio_lo:
        w, h = int(width), int(round(width / ratio_lo))
    elif in_ratio > ratio_hi:
        h, w = int(height), int(round(height * ratio_hi))
    else:
        h, w = int(height), int(width)
    return (height - h) // 2, (width - w) // 2, h, w


@numba.njit(nogil=True)
def flip(seed, epoch, index, view=0):
    """Whether sample `index` is mirrored left-right in this epoch (probability 1/2)."""
    return uniform(sample_stream(seed, epoch, index, FLIP_SALT, view), 0) < 0.5


@numba.njit(nogil=True)
def sample_uniforms(seed, epoch, indices, salt, view, count):
    """float64 [len(indices), count]: row i holds the uniforms of sample indices[i]'s (salt, view) stream."""
    out = np.empty((indices.shape[0], count), dtype=np.float64)
    for i in range(indices.shape[0]):
        key = sample_stream(seed, epoch, indices[i], salt, view)
        for k in range(count):
            out[i, k] = uniform(key, k)
    return out
