"""The caption join of `packing.pack`, on disk and sharded over the packing ranks by key hash.

Packing joins every sample with its rewrites by key and refuses duplicate keys. Held in Python dicts and
sets, that costs memory in proportion to the set (LAION-400M: 400M keys and ~2e9 rewrites, far past any
machine's RAM), and on one rank it costs time in proportion to the set. So the join is a small
map-reduce over the W ranks, through files beside the staged shards (join/):

  scatter (rank r)   its part of the rewrite input (rewrite-store shards s % W == r, or byte range r of a
                     JSONL) and the samples of the shards it staged go to W bucket files by key hash:
                     rewrites (each with its style: the store's pool, the JSONL's "styles") and lookups by
                     the rewrite key, sample keys (duplicate check) by the key;
  join (partition r) the buckets sent to r are joined in a SQLite file (memory at its page cache): every
                     lookup gets [caption] + its rewrites and their styles ([None] + ...), sent on to the
                     rank that owns the sample's shard;
  gather (rank r)    the joined texts of each shard it owns, in shard order (packing.pack writes them as
                     that shard's part of the caption store).
Every step of a rank reads and writes O(N / W) rows; the only whole-set steps left are O(#shards).
"""
from __future__ import annotations

import json
import os
import sqlite3
import zlib
from typing import Callable, Iterable, Iterator

from common.io import read_jsonl, temp_path
from rewrite.quality import same_text

PAGE_CACHE_KIB = 256 * 1024   # SQLite page cache: bounds the join's memory
BULK_ROWS = 50_000            # rows per executemany


def iter_rewrite_rows(path: str, error=ValueError) -> Iterator[tuple[str, list[str]]]:
    """(key, rewrites) from a rewrite store directory or a JSONL of {"key": ..., "rewrites": [...]}, in
    file order; a key may repeat in a JSONL (its lists are concatenated by the join)."""
    if os.path.isdir(path):
        from rewrite import iter_rewrites  # the rewrite stage's reader

        for key, _, rewrites in iter_rewrites(path):
            yield key, rewrites
        return
    for line_no, row in read_jsonl(path, error):
        yield _rewrite_row(row, f"{path}:{line_no}", error)[:2]


def _rewrite_row(row, where: str, error, min_fidelity: float | None = None,
                 dropped: dict | None = None) -> tuple[str, list[str], list]:
    """(key, rewrites, the style of each or None) of one JSONL row {"key", "rewrites"[, "scores"][, "styles"]}.
    With `min_fidelity`, rewrites whose score is below it are left out, counted in `dropped` per style
    ("rewrites" without styles)."""
    try:
        key, texts = row["key"], row["rewrites"]
    except (KeyError, TypeError) as e:
        raise error(f"{where}: expected {{\"key\": ..., \"rewrites\": [...]}} ({e!r})") from None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise error(f"{where}: 'rewrites' must be a list of strings")
    named = row.get("styles")
    if named is not None and (not isinstance(named, list) or len(named) != len(texts)
                              or not all(isinstance(x, str) and x for x in named)):
        raise error(f"{where}: 'styles' must name the style of each rewrite (one non-empty string each)")
    if min_fidelity is None:
        return str(key), texts, named or [None] * len(texts)
    scores, styles = row.get("scores"), named or ["rewrites"] * len(texts)
    if not isinstance(scores, list) or len(scores) != len(texts) or len(styles) != len(texts):
        raise error(f"{where}: a minimum fidelity needs 'scores' (and 'styles', if given) with one entry per "
                    "rewrite (python -m rewrite.fidelity scores a rewrite store)")
    keep = [score >= min_fidelity for score in scores]
    if dropped is not None:
        for style, kept in zip(styles, keep):
            dropped[style] = dropped.get(style, 0) + (not kept)
    return (str(key), [t for t, k in zip(texts, keep) if k],
            [s for s, k in zip(named or [None] * len(texts), keep) if k])


def iter_rewrite_part(path: str, rank: int, parts: int, error=ValueError, min_fidelity: float | None = None,
                      dropped: dict | None = None) -> Iterator[tuple[str, list[str], list]]:
    """Rank `rank`'s share of the rewrite input: the rewrite-store shards s % parts == rank, or the JSONL
    lines that start in byte range [rank, rank + 1) * size / parts. The shares of all ranks are the input.
    With `min_fidelity`, rewrites scoring below it are left out, counted per pool (store) or style (JSONL)
    in `dropped`. Yields (key, rewrites, the style of each: the store's pool, the JSONL's "styles" or None)."""
    if os.path.isdir(path):
        from rewrite.store import iter_rewrites, read_run

        mine = set(range(rank, read_run(path)["num_shards"], parts))
        try:
            for key, _, rewrites, pools in iter_rewrites(path, shards=mine, min_fidelity=min_fidelity,
                                                         dropped=dropped, with_pools=True):
                yield key, rewrites, pools
        except ValueError as e:
            raise error(str(e)) from None
        return
    size = os.path.getsize(path)
    start, end = size * rank // parts, size * (rank + 1) // parts
    with open(path, "rb") as f:
        if start > 0:  # a line belongs to the part it starts in: skip the one running into ours
            f.seek(start - 1)
            f.readline()
        while f.tell() < end:
            at, line = f.tell(), f.readline()
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise error(f"{path}: line at byte {at}: invalid JSON ({e})") from None
            yield _rewrite_row(row, f"{path}: line at byte {at}", error, min_fidelity, dropped)


def partition(key: str, parts: int) -> int:
    """The join partition of a key: stable across processes and machines (Python's hash() is salted)."""
    return zlib.crc32(key.encode("utf-8")) % parts


class Buckets:
    """One JSONL file per destination partition, from one source rank; all appear at close (atomic)."""

    def __init__(self, folder: str, family: str, rank: int, parts: int):
        self.paths = [bucket_path(folder, family, rank, d) for d in range(parts)]
        self.tmps = [temp_path(p) for p in self.paths]  # streamed into, so not atomic_open
        self.files = [open(t, "w", encoding="utf-8") for t in self.tmps]

    def add(self, part: int, row) -> None:
        self.files[part].write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        for f, tmp, path in zip(self.files, self.tmps, self.paths):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)


def bucket_path(folder: str, family: str, source: int, dest: int) -> str:
    return os.path.join(folder, f"{family}.{source:04d}-to-{dest:04d}.jsonl")


def read_buckets(folder: str, family: str, dest: int, parts: int) -> Iterator:
    """The rows every rank sent to partition `dest`, source by source."""
    for source in range(parts):
        with open(bucket_path(folder, family, source, dest), encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def scatter(folder: str, rank: int, parts: int, rewrites: str | None, shards: Iterable[tuple[int, dict]],
            error, min_fidelity: float | None = None) -> dict:
    """Map step of rank `rank`: its rewrite share and its staged shards' samples into bucket files.
    shards: (shard number, staged manifest) of the shards this rank staged. Returns the rewrites left
    out for a fidelity below `min_fidelity`, per pool, and the style names its rewrites carry."""
    out, dropped, styles = Buckets(folder, "rewrites", rank, parts), {}, set()
    for key, texts, named in (iter_rewrite_part(rewrites, rank, parts, error, min_fidelity, dropped)
                              if rewrites else ()):
        styles.update(s for s in named if s is not None)
        out.add(partition(key, parts), [key, texts, named])
    out.close()
    lookups, keys = Buckets(folder, "lookups", rank, parts), Buckets(folder, "keys", rank, parts)
    for shard, m in shards:
        for pos, (key, rkey, caption) in enumerate(zip(m["keys"], m["rewrite_keys"], m["captions"])):
            lookups.add(partition(rkey, parts), [shard, pos, rkey, caption])
            keys.add(partition(key, parts), [key, shard])
    lookups.close()
    keys.close()
    return dropped, sorted(styles)


def join_partition(folder: str, rank: int, parts: int, owner: Callable[[int], int],
                   staged_path: Callable[[int], str], keep_text: Callable[[str], bool], error) -> dict:
    """Reduce step for partition `rank`: duplicate-key check, then [caption] + the rewrites keep_text
    accepts of every lookup, sent to the rank owning its shard. Returns counts (rewrite keys given,
    lookups matched, rewrites dropped and the first keys concerned) and example keys for messages."""
    join = CaptionJoin(os.path.join(folder, f"part-{rank:04d}.sqlite"))
    try:
        join.add_rewrites(read_buckets(folder, "rewrites", rank, parts))
        chunk: list = []
        for row in _chained(read_buckets(folder, "keys", rank, parts), [None]):
            if row is not None:
                chunk.append(row)
            if len(chunk) >= BULK_ROWS or (row is None and chunk):
                duplicate = join.add_keys([k for k, _ in chunk])
                if duplicate is not None:
                    shard = [s for k, s in chunk if k == duplicate][-1]
                    raise error(f"{staged_path(shard)}: duplicate sample key {duplicate!r}")
                chunk = []
        out, matched, dropped, dropped_keys, some_sample_key = Buckets(folder, "joined", rank, parts), 0, 0, [], None
        same = 0
        for shard, pos, rkey, caption in read_buckets(folder, "lookups", rank, parts):
            some_sample_key = some_sample_key or rkey
            found = join.rewrites(rkey)
            matched += found is not None
            rewrites = found or []
            # a "rewrite" that says what the caption says (EDA with nothing to change, a store padded
            # with the original) would only weight the original more in the draw: dropped and counted
            different = [(t, style) for t, style in rewrites if not same_text(t, caption)]
            same += len(rewrites) - len(different)
            usable = [(t, style) for t, style in different if keep_text(t)]
            if len(usable) < len(different):
                dropped += len(different) - len(usable)
                dropped_keys = (dropped_keys + [rkey])[:20]
            # each text keeps its style, whatever was dropped before it
            out.add(owner(shard), [shard, pos, [caption] + [t for t, _ in usable], [None] + [s for _, s in usable]])
        out.close()
        return {"rewrites_given": join.rewrites_given, "rewrites_matched": matched,
                "empty_rewrites_dropped": dropped, "dropped_keys": dropped_keys, "same_as_original_dropped": same,
                "some_rewrite_key": join.some_rewrite_key(), "some_sample_key": some_sample_key}
    finally:
        join.close()


def _chained(rows: Iterator, tail: list) -> Iterator:
    yield from rows
    yield from tail


def gather(folder: str, rank: int, parts: int, sizes: dict[int, int], error) -> tuple[dict[int, list], dict[int, list]]:
    """Texts of the shards this rank owns (sizes: shard -> samples), each list in shard order, and the
    style of each text (None: the original, or a rewrite without one), in the same layout."""
    texts = {shard: [None] * n for shard, n in sizes.items()}
    styles = {shard: [None] * n for shard, n in sizes.items()}
    for shard, pos, row, named in read_buckets(folder, "joined", rank, parts):
        texts[shard][pos], styles[shard][pos] = row, named
    for shard, rows in texts.items():
        if any(r is None for r in rows):
            raise error(f"{folder}: joined texts of shard {shard} are incomplete (a partition was lost?)")
    return texts, styles


class CaptionJoin:
    """A scratch SQLite file: the rewrites by key, and the sample keys seen so far (unique).
    Built from scratch each time (a half-built file from a killed run is simply replaced)."""

    def __init__(self, path: str):
        self.path = path
        for suffix in ("", "-journal"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        self.db = sqlite3.connect(path)
        for pragma in ("journal_mode = MEMORY", "synchronous = OFF", f"cache_size = -{PAGE_CACHE_KIB}",
                       "temp_store = FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE rewrites (key TEXT NOT NULL, texts TEXT NOT NULL)")  # [[text, style], ...]
        self.db.execute("CREATE TABLE samples (key TEXT PRIMARY KEY) WITHOUT ROWID")
        self.rewrites_given = 0

    def add_rewrites(self, rows: Iterable[tuple[str, list[str], list]]) -> None:
        """rows: (key, rewrites, the style of each or None)."""
        chunk = []
        for key, texts, styles in rows:
            chunk.append((key, json.dumps(list(zip(texts, styles)), ensure_ascii=False)))
            if len(chunk) >= BULK_ROWS:
                self.db.executemany("INSERT INTO rewrites VALUES (?, ?)", chunk)
                chunk = []
        self.db.executemany("INSERT INTO rewrites VALUES (?, ?)", chunk)
        self.db.execute("CREATE INDEX rewrites_by_key ON rewrites (key)")   # after the bulk load: faster
        self.db.commit()
        self.rewrites_given = self.db.execute("SELECT COUNT(DISTINCT key) FROM rewrites").fetchone()[0]

    def add_keys(self, keys: list[str]) -> str | None:
        """Record sample keys; returns a key already recorded (a duplicate), or None."""
        try:
            self.db.executemany("INSERT INTO samples VALUES (?)", ((k,) for k in keys))
            return None
        except sqlite3.IntegrityError:
            self.db.rollback()
            for k in keys:
                if self.db.execute("SELECT 1 FROM samples WHERE key = ?", (k,)).fetchone():
                    return k
            seen = set()
            return next(k for k in keys if k in seen or seen.add(k))      # repeated within this shard
        finally:
            self.db.commit()

    def some_rewrite_key(self) -> str | None:
        row = self.db.execute("SELECT key FROM rewrites LIMIT 1").fetchone()
        return row[0] if row else None

    def rewrites(self, key: str) -> list[tuple[str, str | None]] | None:
        """The key's (rewrite, style) pairs (lists of repeated rows concatenated), or None when it has none."""
        rows = self.db.execute("SELECT texts FROM rewrites WHERE key = ? ORDER BY rowid", (key,)).fetchall()
        if not rows:
            return None
        return [t for (texts,) in rows for t in json.loads(texts)]

    def close(self, remove: bool = True) -> None:
        self.db.close()
        if remove:
            os.remove(self.path)
