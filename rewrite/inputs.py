"""Caption input files -> [(key, caption)].

- .txt: one caption per line; the key is the 0-based line number, zero-padded to 9 digits.
- .csv: a header row with `key,caption` columns, or LaCLIP's `relative_image_path,caption` (the path is
  the key), or img2dataset's `url,caption` parquet-like exports with a `key` column.
- .jsonl: one object per line with "key" and "caption".
- img2dataset output: webdataset tars (a .tar, a folder of them, a glob or a brace list such as
  `shards/{00000..00099}.tar`, local or a URL / pipe: command, streamed); the key is the sample's name, the
  caption its .txt member (else "caption" in its .json). Only caption members are read, never the images.
- a URL of one caption file (https://, s3://, gs://): read from its local copy (common/remote_copy.py).
- .parquet (img2dataset's per-shard tables or its url/caption input; needs pyarrow): "caption" (or
  "TEXT"/"text") and "key" columns; without a key column the key is the 0-based row number over the file.
Malformed rows (and bytes that are not UTF-8) stop the run with an error naming the file and the line
(row, or tar member).
"""
from __future__ import annotations

import csv
from pathlib import Path

from common.io import expand_shards, is_url, open_input, read_jsonl

KEY_COLUMNS = ("key", "relative_image_path")


def _check(path, lineno, key, caption, seen):
    if not key:
        raise ValueError(f"{path}:{lineno}: empty key")
    if key in seen:
        first = f"line {seen[key]}" if isinstance(seen[key], int) else seen[key]
        raise ValueError(f"{path}:{lineno}: duplicate key {key!r} (first on {first})")
    if not isinstance(caption, str):
        raise ValueError(f"{path}:{lineno}: caption must be a string, got {type(caption).__name__}")
    seen[key] = lineno if isinstance(lineno, int) else f"{path}:{lineno}"


def _is_tar_spec(spec: str) -> bool:
    return spec.endswith(".tar") or "{" in spec or (Path(spec).is_dir() and any(Path(spec).glob("*.tar")))


def _read_tars(spec: str, seen: dict) -> list[tuple[str, str]]:
    """Captions of img2dataset shards: per sample, the .txt member, else "caption" in the .json member."""
    import json
    import tarfile
    rows = []
    for shard in expand_shards(spec):
        texts: dict[str, str] = {}
        try:
            with open_input(shard) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:  # path or URL
                for member in tar:
                    stem, _, ext = member.name.rpartition("/")[2].partition(".")
                    if not member.isfile() or ext not in ("txt", "json"):
                        continue
                    where = f"{shard}:{member.name}"
                    raw = tar.extractfile(member).read()
                    try:
                        if ext == "txt":
                            texts[stem] = raw.decode("utf-8")
                        elif stem not in texts:
                            caption = json.loads(raw).get("caption")
                            if caption is not None:
                                texts.setdefault(stem, caption)
                    except (UnicodeDecodeError, ValueError, AttributeError) as e:
                        raise ValueError(f"{where}: unreadable caption ({e})") from None
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"{shard}: not a readable tar ({e})") from None
        for key, caption in texts.items():
            _check(shard, key, key, caption, seen)
            rows.append((key, caption.strip()))
    if not rows:
        raise ValueError(f"{spec}: no captions (.txt members or .json with 'caption') in the tars")
    return rows


def _read_parquet(path: Path, seen: dict) -> list[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError kinds for damaged files
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    cap_col = next((c for c in ("caption", "TEXT", "text") if c in table.column_names), None)
    if cap_col is None:
        raise ValueError(f"{path}: columns {table.column_names} need 'caption' (or 'TEXT'/'text')")
    captions = table.column(cap_col).to_pylist()
    keys = (table.column("key").to_pylist() if "key" in table.column_names
            else [f"{i:09d}" for i in range(len(captions))])
    if "status" in table.column_names:       # img2dataset's per-shard table: only downloaded samples
        ok = [st == "success" for st in table.column("status").to_pylist()]
        keys, captions = [k for k, o in zip(keys, ok) if o], [c for c, o in zip(captions, ok) if o]
    rows = []
    for row, (key, caption) in enumerate(zip(keys, captions)):
        _check(path, f"row {row}", str(key), caption, seen)
        rows.append((str(key), caption))
    return rows


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
    """(key, caption) of every row of a caption file; a file without any is a ValueError (an empty store
    written with exit status 0 would hide the mistake)."""
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no captions (an empty file)")
    return rows


def _read_rows(path: str | Path) -> list[tuple[str, str]]:
    seen: dict[str, int] = {}
    if _is_tar_spec(str(path)):
        return _read_tars(str(path), seen)
    if is_url(str(path)):  # one caption file: read from its local copy (common/remote_copy.py)
        from common.remote_copy import local_copy
        path = local_copy(str(path))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} does not exist")
    if path.suffix == ".parquet":
        return _read_parquet(path, seen)
    check_utf8(path)
    rows: list[tuple[str, str]] = []
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
