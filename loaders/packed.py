"""The read side of the packed format (docs/packed-format.md): names, meta.json, the tar and index readers,
verification and the error every reader raises.

The writer (packing/pack.py) and the three loaders all import from here, so a reader never needs the
writer's code (or its ingest dependencies) and the two sides share one definition of each file.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # (numba, imported with loaders.sampling, stays out of the writer's start-up)
    from loaders.sampling import EpochSampler, ShardTable

FORMAT_VERSION = 2  # 2: each packed text carries its style id (loaders/caption_codec.py), meta.json "styles"
READ_VERSIONS = (1, 2)  # a format-1 pack reads the same, its rewrites weighed by position
IDX_VERSION = "v1.2"  # DALI's webdataset index format, as its wds2idx tool writes it

# ffcv.types.HeaderType, copied so that verifying does not import ffcv (numba: seconds)
FFCV_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                        ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)


class PackError(RuntimeError):
    """A packed file is missing, truncated or inconsistent with meta.json (message names the file)."""


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def record_crc_file(name: str) -> str:
    """Per-record checksums of a shard: uint32 little-endian [n, 2] = CRC-32 of each sample's JPEG and of
    its compressed caption record, in shard order (the same bytes in the .beton and the DALI tar)."""
    return f"checksums/{name}.crc32"


def file_entry(out: str, rel: str) -> dict:
    """{rel: {"bytes", "sha256"}} of a file of the pack: what the writer records and verify_pack checks."""
    h = hashlib.sha256()
    with open(os.path.join(out, rel), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {rel: {"bytes": os.path.getsize(os.path.join(out, rel)), "sha256": h.hexdigest()}}


# ---------------------------------------------------------------- verification (whole pack, before reading)
def verify_pack(out_dir: str, *, checksums: bool = False) -> dict:
    """Check a packed dataset before reading it; returns meta.json's dict or raises PackError naming the file.

    Always: meta.json format, keys.txt count, contiguous shards, every file's exact size (a truncated or
    half-copied file fails here), .beton headers, DALI index and checksum-table counts, caption store
    length. checksums=True also re-hashes every file it wrote (shards, per-record checksums, keys, caption
    store) against the sha256 recorded at pack time, and reads every caption-store block against its CRC
    (reads everything)."""
    from loaders.caption_store import CaptionStore, StoreError

    meta_path = os.path.join(out_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise PackError(f"{meta_path}: missing (not a packed dataset, or packing did not finish)")
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read())
    except ValueError as e:
        raise PackError(f"{meta_path}: not valid JSON ({e}): corrupted?") from None
    if meta.get("format_version") not in READ_VERSIONS:
        raise PackError(f"{meta_path}: format_version {meta.get('format_version')!r}, expected one of {READ_VERSIONS}")
    n = meta["num_samples"]
    expected_first = 0
    for s in meta["shards"]:
        if s["first_index"] != expected_first:
            raise PackError(f"{meta_path}: shard {s['name']} starts at {s['first_index']}, expected {expected_first}")
        expected_first += s["num_samples"]
        for rel, info in s["files"].items():
            _check_file(out_dir, rel, info, checksums)
            _check_count(os.path.join(out_dir, rel), s["num_samples"])
    for rel, info in meta.get("files", {}).items():
        _check_file(out_dir, rel, info, checksums)
    if expected_first != n:
        raise PackError(f"{meta_path}: shards hold {expected_first} samples, num_samples says {n}")
    keys_path = os.path.join(out_dir, meta.get("keys_file", "keys.txt"))
    with open(keys_path, "rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    if lines != n:
        raise PackError(f"{keys_path}: {lines} keys, expected {n}")
    try:
        store = CaptionStore(os.path.join(out_dir, "captions"))
        if checksums:
            store.verify()
    except StoreError as e:
        raise PackError(str(e)) from None
    if len(store) != n:
        raise PackError(f"{out_dir}/captions: {len(store)} records, expected {n}")
    return meta


def _check_file(out_dir: str, rel: str, info: dict, checksums: bool) -> None:
    path = os.path.join(out_dir, rel)
    if not os.path.isfile(path):
        raise PackError(f"{path}: missing")
    size = os.path.getsize(path)
    if size != info["bytes"]:
        raise PackError(f"{path}: {size} bytes, expected {info['bytes']} (truncated or modified)")
    if checksums and file_entry(out_dir, rel)[rel]["sha256"] != info["sha256"]:
        raise PackError(f"{path}: sha256 mismatch (corrupted)")


def _check_count(path: str, n: int) -> None:
    if path.endswith(".beton"):
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(FFCV_HEADER.itemsize), FFCV_HEADER)
        if len(header) != 1 or int(header[0]["num_samples"]) != n:
            raise PackError(f"{path}: header does not say {n} samples")
    elif path.endswith(".crc32"):
        if os.path.getsize(path) != 8 * n:
            raise PackError(f"{path}: {os.path.getsize(path)} bytes, expected {8 * n} (two CRC-32s per sample)")
    elif path.endswith(".idx"):
        with open(path) as f:
            first = f.readline().split()
        if first != [IDX_VERSION, str(n)]:
            raise PackError(f"{path}: index header {first}, expected {[IDX_VERSION, str(n)]}")


# ---------------------------------------------------------------- meta.json and the loaders' view of it
@dataclass
class PackedMeta:
    """A pack as the loaders see it: root, meta.json, shard table and the caption dictionary."""

    root: Path
    meta: dict
    shards: ShardTable
    dictionary: bytes | None

    @property
    def shard_names(self) -> list[str]:
        return [s["name"] for s in self.meta["shards"]]

    def record_crcs(self) -> np.ndarray:
        """uint32 [num_samples, 2]: CRC-32 of each sample's JPEG and caption record, as packed."""
        parts = []
        for shard in self.meta["shards"]:
            rel = record_crc_file(shard["name"])
            if rel not in shard.get("files", {}):
                raise PackError(f"{self.root}: packed without per-record checksums ({rel}); re-pack it to "
                                "check records while loading")
            parts.append(np.fromfile(self.root / rel, dtype="<u4").reshape(-1, 2))
        return np.concatenate(parts)


def read_meta(root: str | os.PathLike) -> PackedMeta:
    """meta.json of a pack, checked cheaply (format, file sizes, counts) so a loader fails before any read."""
    from loaders.sampling import ShardTable
    from loaders.caption_store import CaptionStore

    root = Path(root)
    path = root / "meta.json"
    if not path.is_file():
        raise PackError(f"{path}: missing (not a packed dataset root?)")
    try:
        meta = json.loads(path.read_bytes())
    except ValueError as e:  # UnicodeDecodeError included
        raise PackError(f"{path}: not valid JSON ({e}): corrupted?") from None
    if meta.get("format_version") not in READ_VERSIONS:
        raise PackError(f"{path}: format_version {meta.get('format_version')!r}, expected one of {READ_VERSIONS}")
    shards = ShardTable.from_meta(meta)
    for shard in meta["shards"]:  # a truncated or half-copied file fails here, before any read
        for rel, info in shard.get("files", {}).items():
            f = root / rel
            if not f.is_file():
                raise PackError(f"{f}: missing")
            if f.stat().st_size != info["bytes"]:
                raise PackError(f"{f}: {f.stat().st_size} bytes, meta.json says {info['bytes']} (truncated?)")
    if shards.num_samples != meta["num_samples"]:
        raise PackError(f"{path}: shards hold {shards.num_samples} samples, num_samples says {meta['num_samples']}")
    store = CaptionStore(root / "captions")
    if len(store) != meta["num_samples"]:
        raise PackError(f"{root / 'captions'}: {len(store)} records, meta.json says {meta['num_samples']}")
    return PackedMeta(root, meta, shards, store.dictionary)


def sample_key(root: Path, index: int) -> str:
    """The key of sample `index` (line index of keys.txt), for error messages; "?" if unreadable."""
    try:
        with open(Path(root) / "keys.txt", encoding="utf-8", errors="replace") as f:
            return next(itertools.islice(f, index, None)).strip()
    except (OSError, StopIteration):
        return "?"


# ---------------------------------------------------------------- DALI tars and their index files
def parse_tar_index(idx_path: Path, tar_path: Path, num_samples: int) -> np.ndarray:
    """DALI webdataset index -> int64 [n, 4] (jpg offset, jpg size, cap offset, cap size), checked.

    Every entry is checked against the tar header just before it (name field), so a wrong index is
    caught here; the offsets are then rebuilt by scanning the tar's headers (warned, slower)."""
    if not idx_path.is_file():
        raise PackError(f"{idx_path}: missing tar index")
    lines = idx_path.read_text().splitlines()
    if not lines or not lines[0].startswith("v1."):
        raise PackError(f"{idx_path}: not a DALI webdataset index (first line {lines[:1]!r})")
    table = np.zeros((len(lines) - 1, 4), dtype=np.int64)
    names = []
    for row, line in enumerate(lines[1:]):
        parts = line.split()
        members = {parts[i]: (int(parts[i + 1]), int(parts[i + 2]), parts[i + 3])
                   for i in range(0, len(parts) - 3, 4)}
        if "jpg" not in members or "cap" not in members:
            raise PackError(f"{idx_path}: sample {row} lacks a .jpg or .cap member: {line!r}")
        table[row] = (*members["jpg"][:2], *members["cap"][:2])
        names.append((members["jpg"][2], members["cap"][2]))
    if len(table) != num_samples:
        raise PackError(f"{idx_path}: {len(table)} samples, meta.json says {num_samples}")
    size = tar_path.stat().st_size
    end = int(np.max(np.maximum(table[:, 0] + table[:, 1], table[:, 2] + table[:, 3]), initial=0))
    if end > size:
        raise PackError(f"{tar_path}: truncated ({size} bytes, index needs {end})")
    if not _offsets_match(tar_path, table, names):
        warnings.warn(f"{idx_path}: offsets do not match the tar headers; rebuilding them from {tar_path}")
        table = _scan_tar(tar_path, names)
    return table


def _offsets_match(tar_path: Path, table: np.ndarray, names: list) -> bool:
    with open(tar_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        for (jo, _, co, _), (jn, cn) in zip(table.tolist(), names):
            for off, name in ((jo, jn), (co, cn)):
                want = name.encode()[:99]
                if off < 512 or m[off - 512:off - 512 + len(want)] != want:
                    # GNU long names: the real header follows a ././@LongLink entry; accept its data name
                    if not (off >= 512 and m[off - 512:off - 512 + 13] == b"././@LongLink"[:13]):
                        return False
    return True


def _scan_tar(tar_path: Path, names: list) -> np.ndarray:
    where, size = {}, tar_path.stat().st_size
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.offset_data + member.size <= size:
                    where[member.name] = (member.offset_data, member.size)
    except tarfile.TarError as e:
        raise PackError(f"{tar_path}: truncated or corrupt tar ({e})") from None
    try:
        return np.array([(*where[j], *where[c]) for j, c in names], dtype=np.int64)
    except KeyError as e:
        raise PackError(f"{tar_path}: truncated or incomplete: member {e.args[0]} of the index is missing") from None


class TarShards:
    """Random access to the JPEG and caption record of any global index, over the DALI tars (mmap)."""

    def __init__(self, packed: PackedMeta, check_records: bool = False):
        self.packed = packed
        self.crcs = packed.record_crcs() if check_records else None
        self.first = packed.shards.first_index
        self.tables, self.paths = [], []
        for shard in packed.meta["shards"]:
            tar = packed.root / "dali" / f"{shard['name']}.tar"
            if not tar.is_file():
                raise PackError(f"{tar}: missing shard")
            self.tables.append(parse_tar_index(tar.with_suffix(".idx"), tar, shard["num_samples"]))
            self.paths.append(tar)
        self._maps: dict[int, mmap.mmap] = {}  # opened lazily, per process

    def _locate(self, index: int) -> tuple[int, np.ndarray]:
        shard = int(np.searchsorted(self.first, index, side="right")) - 1
        return shard, self.tables[shard][index - self.first[shard]]

    def _map(self, shard: int) -> mmap.mmap:
        if shard not in self._maps:
            with open(self.paths[shard], "rb") as f:
                self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[shard]

    def jpeg(self, index: int) -> memoryview:
        shard, row = self._locate(index)
        return memoryview(self._map(shard))[row[0]:row[0] + row[1]]

    def record(self, index: int) -> bytes:
        shard, row = self._locate(index)
        return self._map(shard)[row[2]:row[2] + row[3]]

    def check(self, index: int, data, column: int) -> None:
        """Compare a member's CRC-32 with the one recorded at pack time (column 0: JPEG, 1: record)."""
        if zlib.crc32(data) != int(self.crcs[index, column]):
            what = ("JPEG", "caption record")[column]
            raise self.error(index, f"{what} checksum mismatch (the file is corrupted)")

    def error(self, index: int, what: str) -> PackError:
        shard, row = self._locate(index)
        header = self._map(shard)[row[0] - 512:row[0] - 412]  # the tar header names the member
        name = header.split(b"\0", 1)[0].decode("utf-8", "replace")
        key = name.rsplit(".", 1)[0] if name.endswith(".jpg") else "?"
        return PackError(f"{self.paths[shard]}: sample {index} (key {key}): {what}")

    def __getstate__(self):  # mmaps do not pickle: workers reopen them
        return {**self.__dict__, "_maps": {}}


class ShardIndex:
    """The lines of each shard's DALI index file (one sample per line), read when a shard is first used."""

    def __init__(self, packed: PackedMeta):
        self.packed = packed
        self._lines: dict[int, np.ndarray] = {}

    def tar(self, shard: int) -> str:
        return str(self.packed.root / "dali" / f"{self.packed.shard_names[shard]}.tar")

    def lines(self, shard: int) -> np.ndarray:
        if shard not in self._lines:
            path = self.tar(shard)[:-4] + ".idx"
            if not os.path.isfile(path):
                raise PackError(f"{path}: missing tar index")
            with open(path, "rb") as f:
                head, *rows = f.read().splitlines()
            n = int(self.packed.shards.sizes[shard])
            if head.split() != [IDX_VERSION.encode(), str(n).encode()] or len(rows) != n:
                raise PackError(f"{path}: expected a '{IDX_VERSION} {n}' index with {n} lines")
            self._lines[shard] = np.array(rows, dtype=object)
        return self._lines[shard]

    def locate(self, index: int) -> tuple[int, list[bytes]]:
        shard = int(np.searchsorted(self.packed.shards.first_index, index, side="right")) - 1
        return shard, self.lines(shard)[index - int(self.packed.shards.first_index[shard])].split()

    def key(self, index: int) -> str:
        """The sample key of a global index (for error messages)."""
        return self.locate(index)[1][3].decode().rsplit(".", 1)[0]

    def jpeg(self, index: int) -> tuple[str, bytes]:
        """(tar path, JPEG bytes) of a global index, read directly (error diagnosis only)."""
        shard, parts = self.locate(index)
        at = parts.index(b"jpg")
        offset, size = int(parts[at + 1]), int(parts[at + 2])
        with open(self.tar(shard), "rb") as f:
            f.seek(offset)
            return self.tar(shard), f.read(size)

    def find_broken_jpeg(self, indices) -> str | None:
        """'<tar>: JPEG of sample i (key k) does not decode (why)' for the first of indices that fails."""
        import simplejpeg

        for i in map(int, indices):
            tar, data = self.jpeg(i)
            try:
                simplejpeg.decode_jpeg(data, colorspace="RGB")
            except ValueError as e:
                return f"{tar}: JPEG of sample {i} (key {self.key(i)!r}) does not decode ({e})"
        return None

    def write_epoch(self, sampler: EpochSampler, folder: str) -> tuple[list[str], list[str]]:
        """Index files for this rank's positions from start_batch on, one per run of one shard, in order.
        Returns (tar paths, index paths) for fn.readers.webdataset."""
        lo = sampler.start_batch * sampler.batch_size
        order = sampler.indices(lo, lo + sampler.positions_left())
        shard_of = np.searchsorted(self.packed.shards.first_index, order, side="right") - 1
        cuts = np.flatnonzero(np.diff(shard_of)) + 1
        tars, indexes = [], []
        for k, (a, b) in enumerate(zip([0, *cuts.tolist()], [*cuts.tolist(), len(order)])):
            shard = int(shard_of[a])
            rows = self.lines(shard)[order[a:b] - self.packed.shards.first_index[shard]]
            path = os.path.join(folder, f"run-{k:06d}.idx")
            with open(path, "wb") as f:
                f.write(f"{IDX_VERSION} {b - a}\n".encode() + b"\n".join(rows) + b"\n")
            tars.append(self.tar(shard))
            indexes.append(path)
        return tars, indexes

