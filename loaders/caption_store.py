"""Reading a caption store (format: loaders/caption_codec.py): random access to every sample's texts.

`CaptionStore` opens the manifest and the dictionary and maps each shard file on first use; `ShardFile`
checks one shard's header and offset index at open and each block's CRC-32 the first time it is read.
The writer (packing/caption_writer.py) opens finished shards with `ShardFile` too, to skip them on a re-run.
"""
from __future__ import annotations

import bisect
import json
import mmap
import os
import struct
import zlib
from typing import NamedTuple

import numpy as np
import zstandard

from common.io import is_temp
from loaders.caption_codec import (DICTIONARY, FOOTER_MAGIC, MAGIC, MANIFEST, READ_VERSIONS, RecordCodec, StoreError,
                                   dictionary_sha256, pad_tokens, read_dictionary, record_styles)
from model.tokenizer import CONTEXT_LENGTH, tokenizer_identity


class ShardFile:
    """One memory-mapped shard file; checks header and index at open, blocks at first touch."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: cannot open caption store shard ({e})") from e
        m = self.map
        if len(m) < 32 or m[:8] != MAGIC:
            raise StoreError(f"{path}: not a caption store shard (bad magic)")
        if m[-8:] != FOOTER_MAGIC:
            raise StoreError(f"{path}: truncated caption store shard (no footer): was the write interrupted?")
        version, header_len = struct.unpack_from("<II", m, 8)
        if version not in READ_VERSIONS:
            raise StoreError(f"{path}: format version {version}, this reader reads {READ_VERSIONS}")
        self.version = version
        try:
            self.header = json.loads(m[16:16 + header_len])
            (footer_len,) = struct.unpack_from("<I", m, len(m) - 12)
            self.footer = json.loads(m[len(m) - 12 - footer_len:len(m) - 12])
        except (ValueError, struct.error) as e:
            raise StoreError(f"{path}: corrupted header or footer ({e})") from e
        n = self.footer["num_samples"]
        index = m[self.footer["index_offset"]:self.footer["index_offset"] + 8 * (n + 1)]
        if zlib.crc32(index) != self.footer["index_crc32"]:
            raise StoreError(f"{path}: offset index checksum mismatch (file corrupted)")
        self.offsets = np.frombuffer(index, dtype="<u8")
        self.block_size = self.footer["block_size"]
        num_blocks = -(-n // self.block_size)
        self.crcs = np.frombuffer(m, dtype="<u4", count=num_blocks, offset=self.footer["crc_offset"])
        self.verified = np.zeros(num_blocks, dtype=bool)
        dict_start = 16 + header_len
        self.dictionary = bytes(m[dict_start:int(self.offsets[0])])
        if dictionary_sha256(self.dictionary) != self.header["dictionary_sha256"]:
            raise StoreError(f"{path}: dictionary checksum mismatch (file corrupted)")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def record(self, i: int) -> bytes:
        block = i // self.block_size
        if not self.verified[block]:
            first = block * self.block_size
            last = min(first + self.block_size, len(self))
            data = self.map[int(self.offsets[first]):int(self.offsets[last])]
            if zlib.crc32(data) != int(self.crcs[block]):
                raise StoreError(f"{self.path}: checksum mismatch in block {block} (samples {first}-{last - 1}),"
                                 f" reading sample {i}: the file is corrupted")
            self.verified[block] = True
        return self.map[int(self.offsets[i]):int(self.offsets[i + 1])]


class _Location(NamedTuple):
    shard: int
    local: int


class CaptionStore:
    """Random access to a store's samples; safe to pass to loader worker processes (reopens there)."""

    def __init__(self, path: str):
        self.path = path
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.exists(manifest_path):
            raise StoreError(f"{path}: no {MANIFEST}: not a caption store, or its write did not finish")
        try:
            with open(manifest_path, "rb") as f:
                self.manifest = json.loads(f.read())
            counts = [int(s["num_samples"]) for s in self.manifest["shards"]]
        except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
            raise StoreError(f"{manifest_path}: corrupted manifest ({type(e).__name__}: {e})") from None
        if self.manifest.get("format_version") not in READ_VERSIONS:
            raise StoreError(f"{manifest_path}: format version {self.manifest.get('format_version')}, "
                             f"this reader reads {READ_VERSIONS}")
        self.styles = list(self.manifest.get("styles", []))  # style id -> name (format 1: none)
        if self.manifest["tokenizer"]["vocab_sha256"] != tokenizer_identity()["vocab_sha256"]:
            raise StoreError(f"{manifest_path}: written with another tokenizer vocabulary")
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
        self._shards: list[ShardFile | None] = [None] * len(counts)
        dict_path = os.path.join(path, DICTIONARY)
        self.dictionary = read_dictionary(dict_path)
        if dictionary_sha256(self.dictionary) != self.manifest.get("dictionary_sha256"):
            raise StoreError(f"{dict_path}: checksum mismatch with {MANIFEST} (the dictionary is corrupted)")
        self.codec = RecordCodec(self.dictionary, self.manifest["zstd_level"])
        self.num_texts = self.manifest["num_texts"]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def _locate(self, i: int) -> _Location:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: sample {i} out of range (store has {len(self)})")
        k = bisect.bisect_right(self._starts, i) - 1
        return _Location(k, i - self._starts[k])

    def _shard(self, k: int) -> ShardFile:
        shard = self._shards[k]
        if shard is None:
            entry = self.manifest["shards"][k]
            shard = ShardFile(os.path.join(self.path, entry["file"]))
            if len(shard) != entry["num_samples"]:
                raise StoreError(f"{shard.path}: {len(shard)} samples, manifest says {entry['num_samples']}")
            self._shards[k] = shard
        return shard

    def verify(self) -> None:
        """Read every shard: header, dictionary, offset index and every block's CRC (StoreError names
        the file and block). What a reader would otherwise find only at the damaged sample."""
        for k in range(len(self._shards)):
            shard = self._shard(k)
            for first in range(0, len(shard), shard.block_size):
                shard.record(first)
            if len(shard) and int(shard.offsets[-1]) != shard.footer["index_offset"]:
                raise StoreError(f"{shard.path}: offset index ends at {int(shard.offsets[-1])}, records end at "
                                 f"{shard.footer['index_offset']} (file corrupted)")

    def record(self, i: int) -> bytes:
        """Sample i's compressed record (what FFCV/DALI files carry)."""
        loc = self._locate(i)
        return self._shard(loc.shard).record(loc.local)

    def _decoded(self, i: int, decode):
        loc = self._locate(i)
        shard = self._shard(loc.shard)
        try:
            return decode(shard.record(loc.local))
        except (zstandard.ZstdError, ValueError) as e:
            raise StoreError(f"{shard.path}: sample {i} (shard-local {loc.local}) cannot be decoded: {e}") from e

    def texts(self, i: int) -> list[np.ndarray]:
        """Sample i's texts as uint16 content ids: [original, rewrite_1, ...]."""
        return self._decoded(i, self.codec.decode)

    def text_styles(self, i: int) -> list[str | None]:
        """The style name of each of sample i's texts (None: the original, or no style recorded)."""
        ids = self._decoded(i, lambda record: record_styles(self.codec.decompress(record)))
        return [self.styles[s] if 0 <= s < len(self.styles) else None for s in ids]

    def draw(self, i: int, seed: int, epoch: int) -> np.ndarray:
        """One text of sample i, chosen uniformly for (seed, epoch, i), padded: int32 [77]."""
        return self._decoded(i, lambda record: self.codec.draw(record, seed, epoch, i))

    def all_texts(self, i: int, max_texts: int) -> tuple[np.ndarray, np.ndarray]:
        """Every text of sample i (up to max_texts, original first): int32 [max_texts, 77] and a mask."""
        texts = self.texts(i)[:max_texts]
        tokens = np.zeros((max_texts, CONTEXT_LENGTH), dtype=np.int32)
        for row, ids in zip(tokens, texts):
            pad_tokens(ids, out=row)
        mask = np.arange(max_texts) < len(texts)
        return tokens, mask


def store_bytes(path: str) -> int:
    """Bytes on disk of a store (all shards, dictionary and manifest)."""
    # left out: temporary files of a write in progress or killed
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if not is_temp(f))
