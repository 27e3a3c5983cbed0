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

Inputs may be URLs (https://, s3://, gs://, any fsspec protocol) or `pipe:CMD`: this is the one place that
recognises and opens them (`is_url`, `open_input`, `expand_shards`); a failure is a RemoteError naming
the URL. common/remote_copy.py makes the local copies of remote packs and eval sets on top of it.
"""
from __future__ import annotations

import contextlib
import glob
import io
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


# ---- remote inputs ----------------------------------------------------------------------------------
# URLs are read through fsspec (https://, s3://, gs://, memory://, file://, ...); `pipe:CMD` reads what a
# shell command writes to its stdout, as webdataset does (`pipe:curl -s URL`, `pipe:aws s3 cp URL -`).
# Tar shards stream from there; packs and eval sets, which the loaders need as local files, are copied
# once into a local cache (common/remote_copy.py). Every failure is a RemoteError naming the URL.
URL = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")
# the package fsspec needs for a scheme (its optional extras): named in the error when it is missing
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}


class RemoteError(ValueError):
    """A URL or pipe: command cannot be read (host unreachable, not found, a package missing): one line."""


def is_url(spec) -> bool:
    return isinstance(spec, str) and bool(URL.match(spec))


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].lower()


@contextlib.contextmanager
def remote_errors(url: str) -> Iterator[None]:
    """Whatever fsspec, its backends or the network raise while reading `url`, as one RemoteError line."""
    try:
        yield
    except RemoteError:
        raise
    except ImportError as e:
        package = PACKAGES.get(_scheme(url)) or e.name or "?"
        raise RemoteError(f"{url}: reading {_scheme(url)}:// needs the {package} package (pip install "
                          f"{package})") from None
    except FileNotFoundError:
        raise RemoteError(f"{url}: not found (no such file or object there)") from None
    except Exception as e:  # aiohttp's, botocore's, google's errors have no common base but Exception
        detail = " ".join(str(e).split()) or type(e).__name__
        raise RemoteError(f"{url}: cannot read it ({type(e).__name__}: {detail})") from None


def url_fs(url: str):
    """(fsspec file system, path in it) of a URL; HTTP waits at most 30 s for a connection."""
    with remote_errors(url):
        import fsspec
        options = {}
        if _scheme(url) in ("http", "https"):
            import aiohttp
            options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=30,
                                                                          sock_read=300)}
        return fsspec.core.url_to_fs(url, **options)


def check_url(url: str) -> None:
    """Raise RemoteError unless `url` can be read now. Over HTTP its first byte is read: fsspec's HEAD
    says "not found" for an unreachable host too, a read tells the two apart. A pipe: command is only
    checked when it runs."""
    if url.startswith("pipe:"):
        return
    fs, path = url_fs(url)
    with remote_errors(url):
        if _scheme(url) in ("http", "https"):
            fs.cat_file(path, start=0, end=1)
        elif not fs.isfile(path):
            raise FileNotFoundError(url)


class _Reader(io.RawIOBase):
    """A stream read from a URL (fsspec) or a pipe: command's stdout whose failures are RemoteErrors: a
    command that exits non-zero fails at the end of its output, so a truncated tar is never taken for a
    short one."""

    def __init__(self, url: str):
        super().__init__()
        self.url, self.proc = url, None
        if url.startswith("pipe:"):
            import subprocess
            self.stderr = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=self.stderr)
            self.stream = self.proc.stdout
        else:
            fs, path = url_fs(url)
            http = _scheme(url) in ("http", "https")
            with remote_errors(url):
                try:  # HTTP: one streamed GET instead of a range request per block
                    self.stream = fs.open(path, "rb", **({"block_size": 0} if http else {}))
                except FileNotFoundError:
                    if http:  # fsspec says "not found" for an unreachable server too: a read tells which
                        fs.cat_file(path, start=0, end=1)
                    raise

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        with remote_errors(self.url):
            data = self.stream.read(len(buffer))
        if not data and self.proc is not None:
            self._check_exit()
        buffer[:len(data)] = data
        return len(data)

    def _check_exit(self) -> None:
        status = self.proc.wait()
        if status != 0:
            self.stderr.seek(0)
            said = [line for line in self.stderr.read().decode("utf-8", "replace").splitlines() if line.strip()]
            raise RemoteError(f"{self.url}: the command exited with status {status}"
                              + (f" ({said[-1].strip()})" if said else ""))

    def close(self) -> None:
        if not self.closed:
            self.stream.close()
            if self.proc is not None:
                self.proc.wait()
                self.stderr.close()
        super().close()


def open_input(spec: str | os.PathLike):
    """A binary stream of a local file, a URL or a pipe: command's output (failures: RemoteError)."""
    if not is_url(spec):
        return open(spec, "rb")
    return io.BufferedReader(_Reader(spec), 1 << 20)


def _expand_urls(spec: str, error: type[Exception]) -> list[str]:
    """A URL or pipe: spec, brace lists expanded (webdataset's syntax); a URL glob (`*`) or a folder
    URL ending in `/` lists the store's .tar files (object stores list; HTTP only with an index page)."""
    from braceexpand import braceexpand
    expanded = list(braceexpand(spec)) if "{" in spec else [spec]
    if spec.startswith("pipe:"):
        return expanded
    urls = []
    for url in expanded:
        if not (glob.has_magic(url) or url.endswith("/")):
            urls.append(url)
            continue
        fs, path = url_fs(url)
        with remote_errors(url):
            found = fs.glob(path) if glob.has_magic(url) else fs.find(path)
        found = sorted(p for p in found if p.endswith(".tar"))
        urls += [p if is_url(p) else fs.unstrip_protocol(p) for p in found]
    if not urls:
        raise error(f"{spec}: no tar shards found")
    return list(dict.fromkeys(urls))


def expand_shards(spec: str | os.PathLike | Iterable, error: type[Exception] = ValueError) -> list[str]:
    """A tar file, a directory of tars, a glob, a webdataset brace list (`shards/{00000..00099}.tar`,
    braceexpand's syntax), a URL or pipe: command (the same forms: _expand_urls), or a list of those ->
    tar paths or URLs (each glob sorted, brace lists in their order).
    A brace list naming a file that does not exist is an error naming it."""
    if not isinstance(spec, (str, os.PathLike)):
        return list(dict.fromkeys(p for s in spec for p in expand_shards(s, error)))
    spec = os.fspath(spec)
    if is_url(spec):
        return _expand_urls(spec, error)
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
