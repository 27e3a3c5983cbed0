"""Writing a caption store (format: loaders/caption_codec.py; reader: loaders/caption_store.py).

`write_store` writes a whole store from one stream of records. A store written in parts (the ranks of a
sharded pack) goes through `save_dictionary` (one process), `write_shard` (each part, its own shard files)
and `write_manifest` (one process, last). Every file appears atomically; a re-run keeps a finished store,
finished shards and the saved dictionary, and redoes a half-written shard.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from array import array
from itertools import islice
from typing import Iterable, Iterator, Sequence

import numpy as np
import zstandard

from common.io import temp_path, write_atomic
from loaders.caption_codec import (DICTIONARY, FOOTER_MAGIC, FORMAT_VERSION, MAGIC, MANIFEST, RecordCodec, StoreError,
                                   dictionary_sha256, raw_record, read_dictionary)
from loaders.caption_store import ShardFile, store_bytes
from model.tokenizer import get_tokenizer, tokenizer_identity


def train_dictionary(raw_records: Sequence[bytes], max_size: int = 112 * 1024) -> bytes:
    """A zstd dictionary from uncompressed records; b"" when there is too little data to learn from."""
    total = sum(map(len, raw_records))
    if len(raw_records) < 64 or total < 8 * 1024:
        return b""
    size = int(min(max_size, max(4096, total // 20)))
    try:
        return zstandard.train_dictionary(size, list(raw_records)).as_bytes()
    except zstandard.ZstdError:
        return b""


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.lcs"


class _ShardWriter:
    """One shard file, streamed: header and dictionary, records as they come, then at close() the offset
    index, the block CRCs and the footer, and the rename into place."""

    def __init__(self, path: str, header: dict, dictionary: bytes, block_size: int):
        self.path, self.tmp = path, temp_path(path)  # streamed into, so not atomic_open
        self.block_size = block_size
        self.file = open(self.tmp, "wb")
        header_bytes = json.dumps(header, sort_keys=True).encode()
        self.file.write(MAGIC + struct.pack("<II", FORMAT_VERSION, len(header_bytes)) + header_bytes + dictionary)
        self.offsets = array("Q", [self.file.tell()])
        self.crcs = array("I")
        self.block_crc = 0
        self.num_texts = 0

    def add(self, record: bytes, n_texts: int) -> None:
        self.file.write(record)
        self.offsets.append(self.offsets[-1] + len(record))
        self.block_crc = zlib.crc32(record, self.block_crc)
        self.num_texts += n_texts
        if (len(self.offsets) - 1) % self.block_size == 0:
            self.crcs.append(self.block_crc)
            self.block_crc = 0

    def close(self) -> dict:
        n = len(self.offsets) - 1
        if n % self.block_size:
            self.crcs.append(self.block_crc)
        index = np.frombuffer(self.offsets, dtype=np.uint64).astype("<u8").tobytes()
        crcs = np.frombuffer(self.crcs, dtype=np.uint32).astype("<u4").tobytes()
        footer = {"num_samples": n, "num_texts": self.num_texts, "index_offset": self.offsets[-1],
                  "crc_offset": self.offsets[-1] + len(index), "block_size": self.block_size,
                  "index_crc32": zlib.crc32(index)}
        footer_bytes = json.dumps(footer, sort_keys=True).encode()
        self.file.write(index + crcs + footer_bytes + struct.pack("<I", len(footer_bytes)) + FOOTER_MAGIC)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return {"file": os.path.basename(self.path), "num_samples": n, "num_texts": self.num_texts}


def _batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _tokenized(records: Iterable[Sequence], batch: int = 4096) -> Iterator[list[np.ndarray]]:
    """Records of strings become records of uint16 ids (tokenized a batch at a time)."""
    tokenizer = get_tokenizer()
    for chunk in _batched(records, batch):
        strings = [t for r in chunk for t in r if isinstance(t, str)]
        ids = iter(tokenizer.encode(strings)) if strings else iter(())
        for record in chunk:
            if not isinstance(record, (list, tuple)):
                raise TypeError(f"a record is a list of texts, got {type(record).__name__}")
            yield [next(ids) if isinstance(t, str) else np.asarray(t, dtype=np.uint16) for t in record]


def write_store(out_dir: str, records: Iterable[Sequence], *, samples_per_shard: int = 1_000_000,
                level: int = 12, dictionary: bytes | None = None, dictionary_samples: int = 100_000,
                block_size: int = 1024, progress: bool = True, total: int | None = None) -> str:
    """Write records ([original, rewrite_1..M] as strings or uint16 id arrays) as a caption store.

    Streams: memory holds one shard's offsets and the dictionary's training sample. Re-running over
    the same records skips a finished store and finished shards, and redoes a half-written one.
    """
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        return out_dir
    stream = _tokenized(records)

    # The dictionary is trained on the first records (bounded) and saved first, so a re-run reuses it.
    head = list(islice(stream, dictionary_samples))
    dict_path = os.path.join(out_dir, DICTIONARY)
    if dictionary is None:
        if os.path.exists(dict_path):
            dictionary = read_dictionary(dict_path)
        else:
            dictionary = train_dictionary([raw_record(r) for r in head])
    write_atomic(dict_path, dictionary)
    codec = RecordCodec(dictionary, level)
    header = _shard_header(dictionary, level, block_size)

    shards, writer, shard_index, skipping = [], None, 0, None
    bar = tqdm(total=total, unit="samples", desc="caption store", disable=not progress, mininterval=1)
    for i, texts in enumerate(_chain(head, stream)):
        if i % samples_per_shard == 0:
            if writer is not None:
                shards.append(writer.close())
            path = os.path.join(out_dir, _shard_name(shard_index))
            skipping = _finished_shard(path, header["dictionary_sha256"])
            writer = None if skipping else _ShardWriter(path, header, dictionary, block_size)
            if skipping:
                shards.append(skipping)
            shard_index += 1
        if writer is not None:
            writer.add(codec.encode(texts), len(texts))
        bar.update(1)
    if writer is not None:
        shards.append(writer.close())
    bar.close()

    manifest = write_manifest(out_dir, shards, dictionary, level)
    if progress:
        print(f"caption store: {manifest['num_samples']} samples, {manifest['num_texts']} texts, "
              f"{len(shards)} shard(s), {store_bytes(out_dir) / max(1, manifest['num_samples']):.1f} "
              f"bytes/sample -> {out_dir}")
    return out_dir


def _shard_header(dictionary: bytes, level: int, block_size: int) -> dict:
    return {"format_version": FORMAT_VERSION, "tokenizer": tokenizer_identity(), "zstd_level": level,
            "dictionary_sha256": dictionary_sha256(dictionary), "block_size": block_size}


def write_manifest(out_dir: str, shards: list[dict], dictionary: bytes, level: int,
                   styles: Sequence[str] = ()) -> dict:
    """manifest.json (last: the store exists from here on) over finished shard entries, in sample order.
    styles: the names of the style ids its records carry."""
    manifest = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer_identity(), "styles": list(styles),
                "num_samples": sum(s["num_samples"] for s in shards),
                "num_texts": sum(s["num_texts"] for s in shards), "shards": shards,
                "dictionary_sha256": dictionary_sha256(dictionary), "zstd_level": level}
    write_atomic(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


# Writing a store in parts (one process per part, e.g. the ranks of a sharded pack): one process trains
# and saves the dictionary, each part writes its own shard files with it, one process writes the manifest.

def save_dictionary(out_dir: str, records: Iterable[Sequence]) -> bytes:
    """Train the dictionary on (a bounded sample of) records and save it; an existing one is kept."""
    path = os.path.join(out_dir, DICTIONARY)
    if not os.path.exists(path):
        os.makedirs(out_dir, exist_ok=True)
        write_atomic(path, train_dictionary([raw_record(r) for r in _tokenized(records)]))
    return read_dictionary(path)


def write_shard(out_dir: str, k: int, records: Iterable[Sequence], dictionary: bytes, *, level: int = 12,
                block_size: int = 1024, styles: Sequence[Sequence[int]] | None = None) -> dict:
    """Shard file k of a store from records (strings or id arrays); a finished one is kept. styles: per
    record, per text 0 (none) or style id + 1 in the manifest's "styles"."""
    path = os.path.join(out_dir, _shard_name(k))
    header = _shard_header(dictionary, level, block_size)
    done = _finished_shard(path, header["dictionary_sha256"])
    if done is not None:
        return done
    writer, codec = _ShardWriter(path, header, dictionary, block_size), RecordCodec(dictionary, level)
    for i, texts in enumerate(_tokenized(records)):
        writer.add(codec.encode(texts, None if styles is None else styles[i]), len(texts))
    return writer.close()


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest


def _finished_shard(path: str, dictionary_sha256: str) -> dict | None:
    """The manifest entry of an already complete shard at `path`, or None (absent or unusable)."""
    if not os.path.exists(path):
        return None
    try:
        shard = ShardFile(path)
    except StoreError:
        return None
    if shard.header.get("dictionary_sha256") != dictionary_sha256 or shard.version != FORMAT_VERSION:
        return None  # (an older format is read, never extended)
    return {"file": os.path.basename(path), "num_samples": len(shard), "num_texts": shard.footer["num_texts"]}
