"""Plain torch DataLoader over a packed dataset, for machines with neither FFCV nor DALI.

It reads the DALI tars directly: the webdataset index (.idx) gives each member's offset, so a sample is
two slices of a memory-mapped tar (JPEG and caption record), with no tar parsing at load time. A worker
process produces whole batches (map-style over batch numbers); every random choice is a function of
(seed, epoch, global index): the crop box is sampling.crop_box, the text draw_text_index, SLIP's colour
parameters augment.simclr_view_seeded. So the batch content is the same for any worker count and
`start_batch` simply starts the batch range later. Decoding is simplejpeg (libjpeg-turbo), the crop is cv2.

A sample that does not decode (corrupted JPEG or caption record) raises PackError naming the tar, the
sample's key and index; the error reaches the training loop and the workers are shut down (they keep the
default SIGTERM handling: a worker that ignored it would hang its parent's exit forever).
"""
from __future__ import annotations

import itertools
import json
import mmap
import os
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
import torch
import zstandard

from loaders import augment
from loaders.sampling import EpochSampler, ShardTable, crop_box
from loaders.store import CaptionStore, RecordCodec, draw_text_index, pad_tokens

CONTEXT_LENGTH = 77


from loaders.pack import PackError, record_crc_file  # noqa: E402  (one error type for every packed-file problem)


@dataclass
class PackedMeta:
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
    root = Path(root)
    path = root / "meta.json"
    if not path.is_file():
        raise PackError(f"{path}: missing (not a packed dataset root?)")
    try:
        meta = json.loads(path.read_bytes())
    except ValueError as e:  # UnicodeDecodeError included
        raise PackError(f"{path}: not valid JSON ({e}): corrupted?") from None
    if meta.get("format_version") != 1:
        raise PackError(f"{path}: format_version {meta.get('format_version')!r}, expected 1")
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


def texts_for(codec: RecordCodec, record: bytes, index: int, *, mode: str, seed: int, epoch: int,
              max_texts: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The tokens of one sample: int32 [77] (rewrite/original) or ([max_texts,77], mask) in all mode."""
    texts = codec.decode(record)
    if mode == "all":
        tokens = np.zeros((max_texts, CONTEXT_LENGTH), dtype=np.int32)
        mask = np.zeros(max_texts, dtype=bool)
        for k, ids in enumerate(texts[:max_texts]):
            tokens[k], mask[k] = pad_tokens(ids), True
        return tokens, mask
    k = 0 if mode == "original" else int(draw_text_index(seed, epoch, index, len(texts)))
    return pad_tokens(texts[k]), None


class _Batches(torch.utils.data.Dataset):
    """Map-style over batch numbers: item b = the whole batch b of this rank's epoch order."""

    def __init__(self, shards: TarShards, sampler: EpochSampler, *, text_mode, max_texts, image_size,
                 augment_images, slip_views, draw_text=True, check_records=False):
        self.shards, self.sampler = shards, sampler
        self.text_mode, self.max_texts, self.image_size = text_mode, max_texts, image_size
        self.augment_images, self.slip_views, self.draw_text = augment_images, slip_views, draw_text
        self.check_records = check_records
        self.codec = RecordCodec(shards.packed.dictionary)

    def __len__(self):
        return self.sampler.num_batches

    def _crop(self, img: np.ndarray, index: int, view: int) -> np.ndarray:
        s, (h, w) = self.sampler, img.shape[:2]
        if view:
            box = crop_box(s.seed, s.epoch, index, h, w, *augment.SIMCLR_SCALE, *augment.CROP_RATIO, view)
        elif self.augment_images:
            box = crop_box(s.seed, s.epoch, index, h, w, *augment.CROP_SCALE, *augment.CROP_RATIO)
        else:
            box = augment.center_crop_box(h, w)
        return augment.crop_resize(img, box, self.image_size)

    def __getitem__(self, b: int):
        s = self.sampler
        indices = s.batch_indices(b)
        size, n = self.image_size, len(indices)
        images = np.empty((n, size, size, 3), dtype=np.uint8)
        views = np.empty((2, n, size, size, 3), dtype=np.uint8) if self.slip_views else None
        tokens, masks = [], []
        for j, index in enumerate(indices.tolist()):
            jpeg = self.shards.jpeg(index)
            if self.check_records:
                self.shards.check(index, jpeg, 0)
            try:
                img = simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
            except ValueError as e:
                raise self.shards.error(index, f"JPEG does not decode ({e})") from None
            images[j] = self._crop(img, index, 0)
            if views is not None:
                views[0, j], views[1, j] = self._crop(img, index, 1), self._crop(img, index, 2)
            if self.draw_text:
                record = self.shards.record(index)
                if self.check_records:
                    self.shards.check(index, record, 1)
                try:
                    t, m = texts_for(self.codec, record, index, mode=self.text_mode,
                                     seed=s.seed, epoch=s.epoch, max_texts=self.max_texts)
                except (zstandard.ZstdError, ValueError, IndexError) as e:
                    raise self.shards.error(index, f"caption record does not decode ({e})") from None
                tokens.append(t)
                masks.append(m)
        out = {"images": torch.from_numpy(images), "index": torch.from_numpy(indices)}
        if tokens:
            out["tokens"] = torch.from_numpy(np.stack(tokens))
            if self.text_mode == "all":
                out["mask"] = torch.from_numpy(np.stack(masks))
        if views is not None:
            out["views"] = torch.from_numpy(views)
        return out


class TorchLoader:
    """Iterable of batches for one (rank, epoch); len() = batches left from start_batch."""

    def __init__(self, root, *, batch_size, text_mode, seed, epoch, rank=0, world_size=1, num_workers=1,
                 image_size=224, max_texts=5, slip_views=False, start_batch=0, drop_last=True, augment=True,
                 draw_text=True, return_dict=False, normalize=True, check_records=False):
        packed = read_meta(root)
        self.sampler = EpochSampler(packed.shards, seed=seed, epoch=epoch, batch_size=batch_size, rank=rank,
                                    world_size=world_size, drop_last=drop_last, start_batch=start_batch)
        self.dataset = _Batches(TarShards(packed, check_records), self.sampler, text_mode=text_mode,
                                max_texts=max_texts, image_size=image_size, augment_images=augment,
                                slip_views=slip_views, draw_text=draw_text, check_records=check_records)
        self.num_workers, self.text_mode, self.slip_views = num_workers, text_mode, slip_views
        self.normalize = normalize
        self.return_dict = return_dict or slip_views

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        order = range(self.sampler.start_batch, self.sampler.num_batches)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, sampler=order, num_workers=self.num_workers,
            prefetch_factor=4 if self.num_workers else None, persistent_workers=False)
        s = self.sampler
        for raw in loader:
            yield finish_batch(raw, self.text_mode, self.return_dict, (s.seed, s.epoch), self.normalize)


def finish_batch(raw: dict, text_mode: str, return_dict: bool, seed_epoch: tuple[int, int], normalize=True):
    """Normalise images (and SLIP views) in the consumer and shape the batch per the loader contract."""
    images = augment.normalize(raw["images"]) if normalize else raw["images"].permute(0, 3, 1, 2)
    out = {"images": images, "index": raw["index"]}
    for key in ("tokens", "mask"):
        if key in raw:
            out[key] = raw[key]
    if "views" in raw:
        index = raw["index"].numpy()
        out["view1"] = augment.simclr_view_seeded(raw["views"][0], *seed_epoch, index, 1)
        out["view2"] = augment.simclr_view_seeded(raw["views"][1], *seed_epoch, index, 2)
    if return_dict:
        return out
    if "tokens" not in out:
        return (out["images"],)
    if text_mode == "all":
        return out["images"], out["tokens"], out["mask"]
    return out["images"], out["tokens"]
