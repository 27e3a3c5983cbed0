"""Reading and writing files the way every stage needs them.

Writes are atomic: the data goes to a temporary file in the destination's folder (`.<name>.<random>.tmp`,
so a rename never crosses file systems and a clean-up can recognise leftovers with `is_temp`), is fsynced,
then renamed over the destination. A reader therefore sees the old file or the new one, never half of
one; a killed writer leaves at most a temporary file. `sync_dir=True` also fsyncs the folder, so the
rename itself survives a power cut (for files whose presence means "this step is finished"). Every writer
of the project goes through here: `atomic_open` (a file object), `atomic_path` (a name, for libraries
that open it themselves), `write_atomic` / `write_json_atomic` (bytes, text, JSON); a writer that streams
into a file it keeps open (the caption store's shards) takes its name from `temp_path`.

Reads of JSONL name the file and line of a bad row, in the caller's error type: a malformed row means
the file is not what we think it is, and the user needs to know where.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import tempfile
from typing import Callable, Iterable, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: str | os.PathLike) -> str:
    """A new empty temporary file beside `path` (`.<name>.<random>.tmp`, mode as open() would give it),
    for a writer that fills it and then replaces `path` with it (fsync, os.replace). Missing folders are
    created."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
    return tmp


def is_temp(name: str | os.PathLike) -> bool:
    """Whether a file name is a temporary file of a write in progress or killed (temp_path's
    `.<name>.<random>.tmp`): the one leftover rule of every clean-up and listing."""
    name = os.path.basename(os.fspath(name))
    return name.startswith(".") and name.endswith(".tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, sync_dir: bool = False) -> Iterator[str]:
    """Yield a temporary path next to `path`; whatever the body writes there replaces `path` when the
    body returns (fsynced first). On an exception the temporary file is removed and `path` is untouched.
    For writers that want a file name (np.savez, safetensors, matplotlib, tarfile, FFCV)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        _fsync_dir(directory)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, sync_dir: bool = False, **open_kwargs) -> Iterator:
    """open(path, mode) through a temporary file that replaces `path` when the body returns (atomic_path);
    text modes default to UTF-8."""
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path, sync_dir=sync_dir) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def write_atomic(path: str | os.PathLike, data: str | bytes, *, sync_dir: bool = False) -> None:
    """Write `data` (str is encoded as UTF-8) to `path` atomically; missing folders are created."""
    with atomic_open(path, "wb", sync_dir=sync_dir) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json_atomic(path: str | os.PathLike, obj, *, sync_dir: bool = False, newline: bool = False,
                      **dump_kwargs) -> None:
    """json.dumps(obj, **dump_kwargs) (plus a final newline if asked) written atomically."""
    write_atomic(path, json.dumps(obj, **dump_kwargs) + ("\n" if newline else ""), sync_dir=sync_dir)


def write_with(path: str | os.PathLike, write: Callable[[str], object], *, sync_dir: bool = False) -> None:
    """Atomically produce `path` with a writer that takes a file name: write(tmp_path)."""
    with atomic_path(path, sync_dir=sync_dir) as tmp:
        write(tmp)


# ---- reading --------------------------------------------------------------------------------------

def utf8_lines(path, error: type[Exception] = ValueError) -> Iterator[str]:
    """The lines of a text file, decoded as UTF-8; a line that is not raises `error` naming file and line."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{line_no}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at column "
                            f"{e.start + 1}); convert the file to UTF-8") from None


def parse_jsonl(lines: Iterable[str], where, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a line that is not a JSON object raises `error`
    naming `where` (the file) and the line."""
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise error(f"{where}:{line_no}: invalid JSON ({e})") from None
        if not isinstance(row, dict):
            raise error(f"{where}:{line_no}: expected a JSON object")
        yield line_no, row


def read_jsonl(path, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file (streamed); a bad line raises `error`
    naming the file and line. Every JSONL reader of the project goes through here."""
    return parse_jsonl(utf8_lines(path, error), path, error)


REMOTE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")


def refuse_remote(spec: str, error: type[Exception] = ValueError) -> None:
    """A URL or `pipe:` command is an error saying what is read instead (not "shards do not exist")."""
    if REMOTE.match(spec):
        raise error(f"{spec}: remote or streamed inputs (https://, s3://, gs://, pipe:) are not supported; "
                    "copy the data here and give its local path (a file, a folder, a glob or a {a..b} brace "
                    "list)")


def expand_shards(spec: str | os.PathLike | Iterable, error: type[Exception] = ValueError) -> list[str]:
    """A tar file, a directory of tars, a glob, a webdataset brace list (`shards/{00000..00099}.tar`,
    braceexpand's syntax), or a list of those -> tar paths (each glob sorted, brace lists in their order).
    A brace list naming a file that does not exist is an error naming it."""
    if not isinstance(spec, (str, os.PathLike)):
        return list(dict.fromkeys(p for s in spec for p in expand_shards(s, error)))
    spec = os.fspath(spec)
    refuse_remote(spec, error)
    if os.path.isdir(spec):
        tars = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not tars:
            raise error(f"{spec}: a folder with neither a captions file (captions.jsonl or captions.csv) "
                        "nor .tar shards")
        return tars
    from braceexpand import braceexpand
    expanded = list(braceexpand(spec)) if "{" in spec else [spec]
    paths, missing = [], []
    for one in expanded:
        found = sorted(glob.glob(one))
        if not found and not glob.has_magic(one) and len(expanded) > 1:
            missing.append(one)
        paths += found
    if missing:
        raise error(f"{spec}: {len(missing)} of {len(expanded)} shards do not exist (first: {missing[0]})")
    if not paths:
        raise error(f"{spec}: no tar shards found")
    return list(dict.fromkeys(paths))
