"""Caption input files -> [(key, caption)].

- .txt: one caption per line; the key is the 0-based line number, zero-padded to 9 digits.
- .csv: a header row with `key,caption` columns, or LaCLIP's `relative_image_path,caption` (the path is
  the key), or img2dataset's `url,caption` parquet-like exports with a `key` column.
- .jsonl: one object per line with "key" and "caption".
Malformed rows (and bytes that are not UTF-8) stop the run with an error naming the file and the line.
"""
from __future__ import annotations

import csv
from pathlib import Path

from loaders.ingest import read_jsonl

KEY_COLUMNS = ("key", "relative_image_path")


def _check(path, lineno, key, caption, seen):
    if not key:
        raise ValueError(f"{path}:{lineno}: empty key")
    if key in seen:
        raise ValueError(f"{path}:{lineno}: duplicate key {key!r} (first on line {seen[key]})")
    if not isinstance(caption, str):
        raise ValueError(f"{path}:{lineno}: caption must be a string, got {type(caption).__name__}")
    seen[key] = lineno


def check_utf8(path: Path) -> None:
    """Raise ValueError naming the first line that is not UTF-8 (before any reader sees a decode error)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1}); re-encode the file as UTF-8") from None


def read_captions(path: str | Path) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} does not exist")
    check_utf8(path)
    rows: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}:1: empty CSV, expected a header with a key column and 'caption'")
            key_col = next((header.index(c) for c in KEY_COLUMNS if c in header), None)
            if key_col is None or "caption" not in header:
                raise ValueError(f"{path}:1: header {header} needs 'caption' and one of {KEY_COLUMNS}")
            cap_col = header.index("caption")
            for row in reader:
                lineno = reader.line_num
                if len(row) != len(header):
                    raise ValueError(f"{path}:{lineno}: expected {len(header)} fields {header}, got {len(row)}")
                _check(path, lineno, row[key_col], row[cap_col], seen)
                rows.append((row[key_col], row[cap_col]))
    elif path.suffix == ".jsonl":
        for lineno, obj in read_jsonl(path):
            try:
                key, caption = str(obj["key"]), obj["caption"]
            except KeyError as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'key' and 'caption' ({e!r})") from e
            _check(path, lineno, key, caption, seen)
            rows.append((key, caption))
    else:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                rows.append((f"{lineno - 1:09d}", line.rstrip("\n")))
    return rows
