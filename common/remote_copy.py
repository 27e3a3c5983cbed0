"""Local copies of remote packs, eval sets and files: the FFCV and DALI loaders (and the eval adapters)
read local files, so a URL given as a pack's `data_root`, an eval `--data-root` or a caption file is
copied here once and read from the copy.

Where: $LACLIP_REMOTE_CACHE, else ~/.cache/laclip/remote. Each copy is <hash of the URL>-<hash of the
content>/<the URL's last name>; the content is a pack's meta.json (it lists every file with its size
and sha256, so a pack is copied without listing the remote folder, which plain HTTP cannot do, and every
file is checked against its sha256 on the way); otherwise the remote listing's names, sizes and
etags or modification times. A changed source is therefore a new copy; an unchanged one is reused after
one small request. A copy is downloaded into a temporary folder beside its place and renamed there when
complete, so a killed download is never taken for a copy (its leftover is removed by the next one). One
process downloads while the others that need the same copy (the other ranks of the node, or of every
node sharing the cache folder) wait on its lock file, then read the finished copy.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from common.io import RemoteError, is_temp, open_input, remote_errors, url_fs


def cache_root() -> Path:
    return Path(os.environ.get("LACLIP_REMOTE_CACHE") or "~/.cache/laclip/remote").expanduser()


def local_copy(url: str) -> Path:
    """The local copy of the remote folder or file `url` (made now if there is none of this content);
    it keeps the URL's last name (an eval set's name comes from its folder's)."""
    if url.startswith("pipe:"):
        raise RemoteError(f"{url}: a pipe: command streams tar shards only; give a pack or an eval set as a "
                          "URL (https://, s3://, gs://) or a local folder")
    url = url.rstrip("/")
    base = url.rsplit("/", 1)[-1] or "root"
    files, signature = _listing(url, base)
    name = f"{_sha(url)[:12]}-{signature[:12]}"
    root = cache_root()
    final = root / name
    if not final.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".{name}.lock"):  # the waiters find the copy made when they get the lock
            if not final.is_dir():
                _download(url, files, root, name)
    return final / base


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def _listing(url: str, base: str) -> tuple[dict[str, tuple[str, dict]], str]:
    """({path in the copy: (source URL, {"bytes", ["sha256"]})}, content hash)."""
    fs, path = url_fs(url)
    with remote_errors(url):
        try:
            raw = fs.cat_file(f"{path}/meta.json")
        except FileNotFoundError:  # not a pack (or a file): list it
            raw = None
        meta = _json_or_none(raw)
        if meta is not None and "shards" in meta:
            listed = {"meta.json": {"bytes": len(raw), "sha256": _sha(raw)}}
            for entry in [s.get("files", {}) for s in meta["shards"]] + [meta.get("files", {})]:
                listed.update(entry)
            return {f"{base}/{rel}": (f"{url}/{rel}", want) for rel, want in listed.items()}, _sha(raw)
        if not fs.isdir(path):  # (an HTTP folder is its index page, which is also a file)
            info = fs.info(path)
            return {base: (url, {"bytes": info.get("size")})}, _sha(_stamp(info))
        files, stamps = {}, []
        for full, info in sorted(fs.find(path, detail=True).items()):
            rel = full[len(path):].lstrip("/") if full.startswith(path) else full.rsplit("/", 1)[-1]
            if info.get("size") is None:  # HTTP listings give names only: ask each file
                info = fs.info(full)
            files[f"{base}/{rel}"] = (f"{url}/{rel}", {"bytes": info.get("size")})
            stamps.append(f"{rel} {_stamp(info)}")
    if not files:
        raise RemoteError(f"{url}: nothing there (an empty or missing folder; over HTTP a folder is read "
                          "from its index page, so the server must list folders)")
    return files, _sha("\n".join(stamps))


def _stamp(info: dict) -> str:
    """What says a remote file changed: its size and whichever of etag / modification time the store gives."""
    keys = ("size", "ETag", "etag", "LastModified", "Last-Modified", "mtime", "updated", "md5Hash")
    return json.dumps({k: str(info[k]) for k in keys if info.get(k) is not None}, sort_keys=True)


def _json_or_none(raw: bytes | None) -> dict | None:
    try:
        value = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(url: str, files: dict[str, tuple[str, dict]], root: Path, name: str) -> None:
    """Every file into a temporary folder, checked against its size (and sha256 when known), then the
    folder renamed to `name`: the copy appears whole or not at all."""
    for leftover in root.glob(f".{name}.*"):  # a killed download's folder (we hold the lock)
        if is_temp(leftover) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))
    start, total = time.perf_counter(), 0
    try:
        for rel, (source, want) in files.items():
            total += _fetch(source, tmp / rel, want)
        os.rename(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"remote: copied {url} ({len(files)} files, {total / 2**20:.1f} MiB, "
          f"{time.perf_counter() - start:.1f} s) to {root / name}", flush=True)


def _fetch(url: str, dest: Path, want: dict) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open_input(url) as src, open(dest, "wb") as out:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
            out.write(block)
            size += len(block)
        out.flush()
        os.fsync(out.fileno())
    if want.get("bytes") is not None and size != want["bytes"]:
        raise RemoteError(f"{url}: {size} bytes read, {want['bytes']} expected (changed or cut off while copying)")
    if want.get("sha256") and digest.hexdigest() != want["sha256"]:
        raise RemoteError(f"{url}: sha256 differs from the pack's meta.json (changed while copying?)")
    return size
