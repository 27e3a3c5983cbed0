"""Packed caption store: every sample's original caption and its rewrites as compressed token arrays.

A store is a directory:

    manifest.json        format version, tokenizer identity, shard list and counts (written last)
    dictionary.zdict     the zstd dictionary, trained on a bounded sample of records
    shard-00000.lcs ...  self-contained shard files (each repeats the dictionary)

A sample's texts form one *record*: uint16 [n_texts, word_1..word_n, ids_1..., ids_n...] (content ids
without start/end tokens, no padding), compressed on its own with the dictionary (zstd frame without
magic, with content size and checksum). Word k holds text k's length in its low byte (texts are cut to 75
tokens) and, since format 2, its style in the high byte: 0 = none (the original, or a rewrite whose source
named no style), s + 1 = the store's style s (manifest "styles": the names, e.g. the rewrite pools), so a
text keeps its style whatever other texts of the sample were dropped. Format-1 stores (high byte always 0)
read the same way, with no styles. One record per sample is what the FFCV and DALI files carry as a
bytes field; `RecordCodec` encodes and decodes it anywhere.

Shard file layout (all integers little-endian):

    b"LACLIPCS" | u32 version | u32 header length | header JSON | dictionary | records ...
    | u64 offsets[n + 1] | u32 crc32 per block of `block_size` records | footer JSON
    | u32 footer length | b"LCSFOOT1"

Offsets are 64-bit (a shard may exceed 4 GiB); a reader memory-maps the shard, checks the header, the
index and, the first time a block is touched, that block's CRC, so a flipped byte is reported with the
file and the sample. Memory does not grow with the number of samples: readers map files, writers keep
one shard's offsets.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import os
import struct
import zlib
from array import array
from itertools import islice
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import zstandard

from common.io import is_temp, temp_path, write_atomic
from model.tokenizer import CONTEXT_LENGTH, EOT_TOKEN_ID, SOT_TOKEN_ID, get_tokenizer, tokenizer_identity

FORMAT_VERSION = 2    # 2: style ids in the high byte of each length word (1: none; still read)
READ_VERSIONS = (1, 2)
LENGTH_MASK, STYLE_SHIFT = 0xFF, 8
MAX_STYLES = 255
MAGIC = b"LACLIPCS"
FOOTER_MAGIC = b"LCSFOOT1"
MANIFEST = "manifest.json"
DICTIONARY = "dictionary.zdict"
MAX_TEXTS = 65535


class StoreError(Exception):
    """A caption store file is missing, truncated, corrupted or of another format."""


def pad_tokens(ids: np.ndarray, context_length: int = CONTEXT_LENGTH, out: np.ndarray | None = None) -> np.ndarray:
    """start + ids + end, zero-padded to the context (ids were cut to fit when they were stored)."""
    row = np.zeros(context_length, dtype=np.int32) if out is None else out
    n = min(len(ids), context_length - 2)
    row[0] = SOT_TOKEN_ID
    row[1:n + 1] = ids[:n]
    row[n + 1] = EOT_TOKEN_ID
    row[n + 2:] = 0
    return row


# ---------------------------------------------------------------------------------------------------
# One record = one sample's texts


def _pack_texts(texts: Sequence[np.ndarray], styles: Sequence[int] | None = None) -> bytes:
    """styles: per text 0 (none) or style id + 1 (at most MAX_STYLES)."""
    if len(texts) > MAX_TEXTS:
        raise ValueError(f"a sample has {len(texts)} texts; at most {MAX_TEXTS} fit a record")
    lengths = [len(t) for t in texts]
    if max(lengths, default=0) > LENGTH_MASK:
        raise ValueError(f"a text of {max(lengths)} tokens: texts are cut to {CONTEXT_LENGTH - 2} tokens")
    if styles is not None:
        if len(styles) != len(texts) or not all(0 <= x <= MAX_STYLES for x in styles):
            raise ValueError(f"styles {list(styles)}: one per text, each 0 (none) to {MAX_STYLES}")
        lengths = [n | (x << STYLE_SHIFT) for n, x in zip(lengths, styles)]
    head = np.array([len(texts), *lengths], dtype="<u2")
    return head.tobytes() + b"".join(np.asarray(t, dtype="<u2").tobytes() for t in texts)


def record_styles(raw: bytes) -> list[int]:
    """Style id of each text of a raw record, -1 for none (the original; a format-1 record's texts)."""
    words = np.frombuffer(raw, dtype="<u2")
    n = int(words[0])
    return ((words[1:n + 1] >> STYLE_SHIFT).astype(np.int64) - 1).tolist()


def _unpack_texts(raw: bytes) -> list[np.ndarray]:
    words = np.frombuffer(raw, dtype="<u2")
    n = int(words[0])
    lengths = words[1:n + 1] & LENGTH_MASK
    if len(words) != 1 + n + int(lengths.sum(dtype=np.int64)):
        raise ValueError("record length does not match its text lengths")
    ends = np.cumsum(lengths, dtype=np.int64) + 1 + n
    return [words[end - length:end] for end, length in zip(ends.tolist(), lengths.tolist())]


def _unpack_one(raw: bytes, k: int) -> np.ndarray:
    """Text k of a raw record, without splitting the others."""
    head = np.frombuffer(raw, dtype="<u2", count=min(len(raw) // 2, 1 + k + 1))
    n = int(head[0])
    if not 0 <= k < n:
        raise ValueError(f"text {k} asked of a record with {n} texts")
    lengths = (np.frombuffer(raw, dtype="<u2", count=n, offset=2) & LENGTH_MASK).tolist()
    start = 1 + n + sum(lengths[:k])
    return np.frombuffer(raw, dtype="<u2", count=lengths[k], offset=2 * start)


class RecordCodec:
    """Compresses and decompresses single records with one (optional) zstd dictionary."""

    def __init__(self, dictionary: bytes | None = None, level: int = 12):
        self.dictionary = dictionary or b""
        self.level = level
        self._dict = zstandard.ZstdCompressionDict(self.dictionary) if self.dictionary else None
        self._compressor = None
        self._decompressor = None

    def _params(self):
        return dict(format=zstandard.FORMAT_ZSTD1_MAGICLESS)

    def encode(self, texts: Sequence[np.ndarray], styles: Sequence[int] | None = None) -> bytes:
        if self._compressor is None:
            params = zstandard.ZstdCompressionParameters.from_level(
                self.level, write_checksum=True, write_content_size=True, write_dict_id=False,
                **self._params())
            self._compressor = zstandard.ZstdCompressor(dict_data=self._dict, compression_params=params)
        return self._compressor.compress(_pack_texts(texts, styles))

    def decompress(self, record: bytes) -> bytes:
        if self._decompressor is None:
            self._decompressor = zstandard.ZstdDecompressor(dict_data=self._dict, **self._params())
        return self._decompressor.decompress(record)

    def decode(self, record: bytes) -> list[np.ndarray]:
        return _unpack_texts(self.decompress(record))

    def decode_styled(self, record: bytes) -> tuple[list[np.ndarray], list[int]]:
        """(texts, style id of each, -1 = none)."""
        raw = self.decompress(record)
        return _unpack_texts(raw), record_styles(raw)

    def draw(self, record: bytes, seed: int, epoch: int, sample_index: int) -> np.ndarray:
        """The text of this record that (seed, epoch, sample_index) draws, padded: int32 [77]."""
        from loaders.sampling import draw_text_index  # (numba: imported by readers only)

        raw = self.decompress(record)
        n = int.from_bytes(raw[:2], "little")
        return pad_tokens(_unpack_one(raw, draw_text_index(seed, epoch, sample_index, n)))  # uniform: no styles

    def __getstate__(self):  # compressor objects do not pickle; workers rebuild them
        return {"dictionary": self.dictionary, "level": self.level}

    def __setstate__(self, state):
        self.__init__(state["dictionary"], state["level"])


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


# ---------------------------------------------------------------------------------------------------
# Writing


def _atomic_write(path: str, data: bytes) -> None:
    write_atomic(path, data)


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.lcs"


class _ShardWriter:
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
            with open(dict_path, "rb") as f:
                dictionary = f.read()
        else:
            dictionary = train_dictionary([_pack_texts(r) for r in head])
    _atomic_write(dict_path, dictionary)
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
            "dictionary_sha256": hashlib.sha256(dictionary).hexdigest(), "block_size": block_size}


def write_manifest(out_dir: str, shards: list[dict], dictionary: bytes, level: int,
                   styles: Sequence[str] = ()) -> dict:
    """manifest.json (last: the store exists from here on) over finished shard entries, in sample order.
    styles: the names of the style ids its records carry."""
    manifest = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer_identity(), "styles": list(styles),
                "num_samples": sum(s["num_samples"] for s in shards),
                "num_texts": sum(s["num_texts"] for s in shards), "shards": shards,
                "dictionary_sha256": hashlib.sha256(dictionary).hexdigest(), "zstd_level": level}
    _atomic_write(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


# Writing a store in parts (one process per part, e.g. the ranks of a sharded pack): one process trains
# and saves the dictionary, each part writes its own shard files with it, one process writes the manifest.

def save_dictionary(out_dir: str, records: Iterable[Sequence]) -> bytes:
    """Train the dictionary on (a bounded sample of) records and save it; an existing one is kept."""
    path = os.path.join(out_dir, DICTIONARY)
    if not os.path.exists(path):
        os.makedirs(out_dir, exist_ok=True)
        _atomic_write(path, train_dictionary([_pack_texts(r) for r in _tokenized(records)]))
    with open(path, "rb") as f:
        return f.read()


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
        shard = _Shard(path)
    except StoreError:
        return None
    if shard.header.get("dictionary_sha256") != dictionary_sha256 or shard.version != FORMAT_VERSION:
        return None  # (an older format is read, never extended)
    return {"file": os.path.basename(path), "num_samples": len(shard), "num_texts": shard.footer["num_texts"]}


def store_bytes(path: str) -> int:
    """Bytes on disk of a store (all shards, dictionary and manifest)."""
    # left out: temporary files of a write in progress or killed
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if not is_temp(f))


# ---------------------------------------------------------------------------------------------------
# Reading


class _Shard:
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
        if hashlib.sha256(self.dictionary).hexdigest() != self.header["dictionary_sha256"]:
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
        self._shards: list[_Shard | None] = [None] * len(counts)
        dict_path = os.path.join(path, DICTIONARY)
        try:
            with open(dict_path, "rb") as f:
                self.dictionary = f.read()
        except OSError as e:
            raise StoreError(f"{dict_path}: cannot read the zstd dictionary ({e})") from None
        if hashlib.sha256(self.dictionary).hexdigest() != self.manifest.get("dictionary_sha256"):
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

    def _shard(self, k: int) -> _Shard:
        shard = self._shards[k]
        if shard is None:
            entry = self.manifest["shards"][k]
            shard = _Shard(os.path.join(self.path, entry["file"]))
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
