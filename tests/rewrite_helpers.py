"""What the rewrite tests share: caption files, a real vLLM server, store comparison.

The tiny model (conftest's `tiny_model`) is a randomly initialised 2-layer Llama whose rewrites are
random text, so the tests check mechanics (seeds, files, resume, servers), not quality. The vLLM server
is the project's own CPU engine (rewrite.vllm_server) from .venv-vllm, started once per test session on
127.0.0.1.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rewrite.store import filter_counts, iter_rewrites, read_run
from tests.conftest import CAPTIONS, REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def vllm_available() -> bool:
    from rewrite.engines import vllm_importable
    from rewrite.vllm_server import vllm_python
    try:
        return vllm_importable() or vllm_python().is_file()
    except FileNotFoundError:
        return False


needs_vllm = pytest.mark.skipif(not vllm_available(), reason="no vLLM: scripts/setup.sh builds .venv-vllm")

_servers: dict = {}
# the tiny model needs little KV cache; the default 2 GiB per server adds up when servers run side by side
TEST_SERVER_OPTIONS = {"kv_cache_memory_bytes": 256 * 2**20}


def stop_shared_servers() -> None:
    """Ends the shared servers (each test module that uses them stops them when it is done, so that no
    server outlives its module into tests that start their own)."""
    while _servers:
        _servers.popitem()[1].stop()


def shared_server(model: str):
    """One vLLM server on the tiny model for the whole session (startup costs tens of seconds)."""
    from rewrite.vllm_server import VLLMServer
    if model not in _servers:
        _servers[model] = VLLMServer(model, served_name="tiny", seed=0, threads=1, options=TEST_SERVER_OPTIONS)
        atexit.register(_servers[model].stop)
    why = _servers[model].died()
    if why:  # say why here, not as a refused connection in whichever test comes next
        pytest.fail(f"the shared test server died: {why}")
    return _servers[model]


def write_captions(path: Path, captions=CAPTIONS) -> Path:
    path.write_text("\n".join(captions) + "\n")
    return path


def rewrite_cli(*args, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rewrite", *map(str, args), "--no-progress"], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def store_contents(out) -> tuple:
    """Everything a store holds that must not depend on kills, resumes or batch sizes."""
    return list(iter_rewrites(out)), filter_counts(out), read_run(out)["num_shards"]
