"""The caption store's format: what its writer (packing/caption_writer.py) and its reader
(loaders/caption_store.py) share: constants, the record codec and the dictionary file.

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

import hashlib
from typing import Sequence

import numpy as np
import zstandard

from model.tokenizer import CONTEXT_LENGTH, EOT_TOKEN_ID, SOT_TOKEN_ID

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


def raw_record(texts: Sequence[np.ndarray], styles: Sequence[int] | None = None) -> bytes:
    """A record's uncompressed bytes. styles: per text 0 (none) or style id + 1 (at most MAX_STYLES)."""
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


def record_texts(raw: bytes) -> list[np.ndarray]:
    """Every text of a raw record."""
    words = np.frombuffer(raw, dtype="<u2")
    n = int(words[0])
    lengths = words[1:n + 1] & LENGTH_MASK
    if len(words) != 1 + n + int(lengths.sum(dtype=np.int64)):
        raise ValueError("record length does not match its text lengths")
    ends = np.cumsum(lengths, dtype=np.int64) + 1 + n
    return [words[end - length:end] for end, length in zip(ends.tolist(), lengths.tolist())]


def record_text(raw: bytes, k: int) -> np.ndarray:
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
        return self._compressor.compress(raw_record(texts, styles))

    def decompress(self, record: bytes) -> bytes:
        if self._decompressor is None:
            self._decompressor = zstandard.ZstdDecompressor(dict_data=self._dict, **self._params())
        return self._decompressor.decompress(record)

    def decode(self, record: bytes) -> list[np.ndarray]:
        return record_texts(self.decompress(record))

    def decode_styled(self, record: bytes) -> tuple[list[np.ndarray], list[int]]:
        """(texts, style id of each, -1 = none)."""
        raw = self.decompress(record)
        return record_texts(raw), record_styles(raw)

    def draw(self, record: bytes, seed: int, epoch: int, sample_index: int) -> np.ndarray:
        """The text of this record that (seed, epoch, sample_index) draws, padded: int32 [77]."""
        from loaders.sampling import draw_text_index  # (numba: imported by readers only)

        raw = self.decompress(record)
        n = int.from_bytes(raw[:2], "little")
        return pad_tokens(record_text(raw, draw_text_index(seed, epoch, sample_index, n)))  # uniform: no styles

    def __getstate__(self):  # compressor objects do not pickle; workers rebuild them
        return {"dictionary": self.dictionary, "level": self.level}

    def __setstate__(self, state):
        self.__init__(state["dictionary"], state["level"])


# ---------------------------------------------------------------------------------------------------
# The dictionary file


def dictionary_sha256(dictionary: bytes) -> str:
    """The digest that shard headers and the manifest record of the store's dictionary."""
    return hashlib.sha256(dictionary).hexdigest()


def read_dictionary(path: str) -> bytes:
    """A store's dictionary.zdict (b"" is a valid dictionary: none was trained)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise StoreError(f"{path}: cannot read the zstd dictionary ({e})") from None
