"""Ingest: read the image-text formats users have as one stream of `Sample`s.

Formats:
  - webdataset tar shards as img2dataset writes them (<key>.jpg|.png|.webp, <key>.txt, <key>.json)
  - LaCLIP's CSV (`relative_image_path,caption`, images under an image root)
  - an image folder with a captions file (CSV or JSONL; fields `file` or `path`, `caption`, optional `key`,
    any other field is kept as metadata)

Every reader streams (memory does not grow with the dataset). Records that cannot be used (empty caption,
missing image file, unreadable tar member) are reported to an `IngestReport` with their key and file and
skipped; a malformed row (wrong number of CSV fields, invalid JSON) is an `IngestError` naming file and line,
because it means the file itself is not what we think it is.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import re
import tarfile
from typing import Iterable, Iterator

from common.io import expand_shards as _expand_shards, open_input, read_jsonl, utf8_lines

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Keys become tar member names and lines of keys.txt: no dots (DALI splits the extension at the first
# dot), no slashes, no whitespace.
KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


class IngestError(ValueError):
    """The input itself is malformed (not one bad record): stop with file and line."""


@dataclasses.dataclass
class Sample:
    key: str
    caption: str
    image: bytes | None = None  # encoded image bytes (tar members) ...
    path: str | None = None  # ... or a file to read them from
    meta: dict = dataclasses.field(default_factory=dict)  # "rewrite_key": key in the rewrite store if not `key`

    def read_image(self) -> bytes:
        if self.image is not None:
            return self.image
        with open(self.path, "rb") as f:
            return f.read()

    @property
    def source(self) -> str:
        """Where the record came from, for error reports."""
        return self.path or self.meta.get("__source__", "?")


class IngestReport:
    """Counts of skipped records by reason, plus the first `keep` of them with key and file."""

    def __init__(self, keep: int = 1000):
        self.counts: collections.Counter = collections.Counter()
        self.records: list[dict] = []
        self.keep = keep

    def skip(self, reason: str, key: str, file: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.records) < self.keep:
            self.records.append({"reason": reason, "key": key, "file": file, "detail": detail})

    def merge(self, other: "IngestReport") -> None:
        self.counts.update(other.counts)
        self.records.extend(other.records[: max(0, self.keep - len(self.records))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "skipped 0"
        return f"skipped {self.total} (" + ", ".join(f"{r}: {n}" for r, n in sorted(self.counts.items())) + ")"


def clean_caption(text: str | None) -> str:
    """Whitespace collapsed; "" when nothing would be left for the tokenizer (e.g. only control characters)."""
    from model.tokenizer import has_tokens

    text = " ".join((text or "").split())
    return text if has_tokens(text) else ""


def check_key(key: str, where: str) -> str:
    if not KEY_RE.match(key):
        raise IngestError(f"{where}: sample key {key!r} must match {KEY_RE.pattern} (no dots, slashes or spaces)")
    return key


# ---------------------------------------------------------------- webdataset (img2dataset) shards
def expand_shards(spec: str | os.PathLike | Iterable) -> list[str]:
    """Tar paths of a shard spec (common/io.py: a tar, a folder of tars, a glob, a brace list, or a list of
    those); a spec that names nothing is an IngestError."""
    return _expand_shards(spec, IngestError)


def iter_webdataset(shards, report: IngestReport) -> Iterator[Sample]:
    """img2dataset shards: members of one sample are consecutive and share the name before the first dot."""
    for shard in expand_shards(shards):
        try:
            yield from _iter_one_tar(shard, report)
        except tarfile.TarError as e:
            report.skip("broken_tar", "*", shard, str(e))


def _iter_one_tar(shard: str, report: IngestReport) -> Iterator[Sample]:
    group: dict[str, bytes] = {}
    current = None
    with open_input(shard) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:  # a path or a URL
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            if base.startswith("."):
                continue
            key, _, ext = base.partition(".")
            if key != current:
                if current is not None:
                    yield from _wds_sample(current, group, shard, report)
                current, group = key, {}
            group[ext.lower()] = tar.extractfile(member).read()
        if current is not None:
            yield from _wds_sample(current, group, shard, report)


def _wds_sample(key: str, group: dict, shard: str, report: IngestReport) -> Iterator[Sample]:
    where = f"{shard}:{key}"
    image = next((group[e] for e in IMAGE_EXTS if e in group), None)
    if image is None:
        report.skip("missing_image", key, shard)
        return
    caption = clean_caption(group.get("txt", b"").decode("utf-8", "replace"))
    if not caption:
        report.skip("empty_caption", key, shard)
        return
    meta = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"])
        except ValueError as e:
            report.skip("bad_json", key, shard, str(e))
            return
    meta["__source__"] = where
    yield Sample(key=check_key(key, where), caption=caption, image=image, meta=meta)


# ---------------------------------------------------------------- LaCLIP CSV
def iter_laclip_csv(csv_path: str, image_root: str | None, report: IngestReport) -> Iterator[Sample]:
    """`relative_image_path,caption` rows (header optional); keys are the 0-based row number, 9 digits."""
    image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(csv_path))
    reader = csv.reader(utf8_lines(csv_path, IngestError))
    index = 0
    for row in reader:
        line = reader.line_num
        if line == 1 and [c.strip().lower() for c in row] in (["relative_image_path", "caption"],
                                                              ["filepath", "title"], ["file", "caption"]):
            continue  # header
        if not row:
            continue
        if len(row) != 2:
            raise IngestError(f"{csv_path}:{line}: expected 2 fields (relative_image_path,caption), got {len(row)}")
        key = f"{index:09d}"
        index += 1
        path = os.path.join(image_root, row[0])
        # the rewrite stage keys LaCLIP rows by their path (rewrite.import_laclip); the pack key must be
        # tar-safe, so the path is kept as the key to join rewrites on
        meta = {"__source__": f"{csv_path}:{line}", "rewrite_key": row[0]}
        sample = _file_sample(key, path, row[1], meta, report)
        if sample is not None:
            yield sample


def _file_sample(key, path, caption, meta, report) -> Sample | None:
    caption = clean_caption(caption)
    if not caption:
        report.skip("empty_caption", key, path)
        return None
    if not os.path.isfile(path):
        report.skip("missing_file", key, path)
        return None
    return Sample(key=key, caption=caption, path=path, meta=meta)


# ---------------------------------------------------------------- image folder + captions CSV / JSONL
def find_captions_file(root: str) -> str | None:
    for name in ("captions.jsonl", "captions.csv"):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def iter_image_folder(root: str, report: IngestReport, captions_file: str | None = None) -> Iterator[Sample]:
    """Rows with `file` (or `path`) relative to root and `caption`; optional `key` (default: row number)."""
    captions_file = captions_file or find_captions_file(root)
    if captions_file is None:
        raise IngestError(f"{root}: no captions.jsonl or captions.csv")
    for index, (line, row) in enumerate(_iter_rows(captions_file)):
        where = f"{captions_file}:{line}"
        rel = row.pop("file", None) or row.pop("path", None)
        if rel is None or "caption" not in row:
            raise IngestError(f"{where}: expected fields 'file' (or 'path') and 'caption', got {sorted(row)}")
        key = check_key(str(row.pop("key", None) or f"{index:09d}"), where)
        caption = row.pop("caption")
        sample = _file_sample(key, os.path.join(root, rel), caption, {**row, "__source__": where}, report)
        if sample is not None:
            yield sample


def _iter_rows(path: str) -> Iterator[tuple[int, dict]]:
    if path.endswith(".jsonl"):
        yield from read_jsonl(path, IngestError)
        return
    reader = csv.reader(utf8_lines(path, IngestError))
    header = next(reader, None)
    if header is None:
        return
    header = [h.strip() for h in header]
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise IngestError(f"{path}:{reader.line_num}: expected {len(header)} fields {header}, got {len(row)}")
        yield reader.line_num, dict(zip(header, row))
