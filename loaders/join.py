"""The caption join of `loaders.pack`, on disk: sample keys and rewrites indexed in SQLite.

Packing joins every sample with its rewrites by key and refuses duplicate keys. Held in Python dicts and
sets, that costs memory in proportion to the set (LAION-400M: 400M keys and ~2e9 rewrites, far past any
machine's RAM). Here both live in one SQLite file beside the staged shards: memory stays at SQLite's
page cache whatever the size, and the join reads one staged shard at a time.
"""
from __future__ import annotations

import json
import os
import sqlite3
from typing import Iterable, Iterator

from loaders.ingest import read_jsonl

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
        try:
            key, texts = row["key"], row["rewrites"]
        except KeyError as e:
            raise error(f"{path}:{line_no}: expected {{\"key\": ..., \"rewrites\": [...]}} ({e!r})") from None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise error(f"{path}:{line_no}: 'rewrites' must be a list of strings")
        yield str(key), texts


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
        self.db.execute("CREATE TABLE rewrites (key TEXT NOT NULL, texts TEXT NOT NULL)")
        self.db.execute("CREATE TABLE samples (key TEXT PRIMARY KEY) WITHOUT ROWID")
        self.rewrites_given = 0

    def add_rewrites(self, rows: Iterable[tuple[str, list[str]]]) -> None:
        chunk = []
        for key, texts in rows:
            chunk.append((key, json.dumps(texts, ensure_ascii=False)))
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

    def rewrites(self, key: str) -> list[str] | None:
        """The key's rewrites (lists of repeated rows concatenated), or None when it has none."""
        rows = self.db.execute("SELECT texts FROM rewrites WHERE key = ? ORDER BY rowid", (key,)).fetchall()
        if not rows:
            return None
        return [t for (texts,) in rows for t in json.loads(texts)]

    def close(self, remove: bool = True) -> None:
        self.db.close()
        if remove:
            os.remove(self.path)
