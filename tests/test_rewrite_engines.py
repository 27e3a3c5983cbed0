"""The server engines against real local vLLM servers (vLLM's CPU build from .venv-vllm, tiny Llama):
`openai` (many requests in flight, several servers, a server dying mid-run) and rank sharding over
processes that each have their own engine."""
from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from rewrite.config import RewriteConfig
from rewrite.engines import Request
from rewrite.openai_engine import OpenAIEngine, ServerError
from rewrite.pipeline import run
from rewrite.pools import load_pool
from rewrite.prompt import build_prompt, draw_examples
from rewrite.vllm_server import VLLMServer
from tests.conftest import CAPTIONS
from tests.rewrite_helpers import (needs_vllm, rewrite_cli, shared_server, TEST_SERVER_OPTIONS,
                                   stop_shared_servers, store_contents, write_captions)


@pytest.fixture(scope="module", autouse=True)
def _shared_server_ends_with_this_module():
    yield
    stop_shared_servers()


pytestmark = [needs_vllm, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server(tiny_model):
    return shared_server(tiny_model)


@pytest.fixture(scope="module")
def second_server(tiny_model):
    """A second server on the same model (the last test here kills it)."""
    with VLLMServer(tiny_model, served_name="tiny", seed=0, threads=1, options=TEST_SERVER_OPTIONS) as s:
        yield s


def requests_for(captions, seed=0):
    pool = load_pool("human")
    return [Request(str(i), c, build_prompt(c, draw_examples(pool, seed, str(i))), 1000 + i + seed)
            for i, c in enumerate(captions)]


def finished_requests(server) -> float:
    """Requests the server has finished (its Prometheus counter)."""
    text = httpx.get(server.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


def test_openai_engine_per_request_seeds(server):
    engine = OpenAIEngine([server.base_url], max_in_flight=8)
    assert engine.model_id == "tiny"  # the server's own model by default
    reqs = requests_for(CAPTIONS[:6])
    together = engine.generate(reqs, 2)
    assert len(together) == 6 and all(len(x) == 2 and all("\n" not in t for t in x) for x in together)
    assert engine.tokens_generated > 0
    one_by_one = [engine.generate([r], 2)[0] for r in reversed(reqs)][::-1]
    assert one_by_one == together  # neither batch nor order changes a caption's rewrites
    assert engine.generate(requests_for(CAPTIONS[:6], seed=1), 2) != together


def test_openai_spreads_over_servers(server, second_server):
    reqs = requests_for(CAPTIONS)
    before = finished_requests(server), finished_requests(second_server)
    both = OpenAIEngine([server.base_url, second_server.base_url], max_in_flight=2)
    out = both.generate(reqs, 1)
    served = finished_requests(server) - before[0], finished_requests(second_server) - before[1]
    assert sum(served) == len(reqs) and min(served) >= 1, served
    assert out == OpenAIEngine([server.base_url]).generate(reqs, 1)  # same model, same seeds: same text


def test_openai_pipeline_independent_of_batch_size(tmp_path, server):
    inputs = write_captions(tmp_path / "caps.txt")
    stores = []
    for batch in (3, 12):
        cfg = RewriteConfig(input=str(inputs), out=str(tmp_path / f"b{batch}"), engine="openai",
                            base_urls=[server.base_url], pools=["coco", "human"], shard_size=5,
                            batch_size=batch, max_in_flight=4, progress=False)
        summary = run(cfg)
        assert summary["shards_written"] == 3 * 2
        stores.append(store_contents(cfg.out))
    assert stores[0] == stores[1]


def test_two_ranks_each_with_its_own_engine(tmp_path, server):
    """N processes split the shards (rank r takes r, r+N, ...); together they equal one process."""
    inputs = write_captions(tmp_path / "caps.txt")
    common = ["--engine", "openai", "--base-url", server.base_url, "--input", inputs, "--pools", "coco",
              "--shard-size", "2", "--world-size", "2"]
    procs = [rewrite_cli(*common, "--out", tmp_path / "ranks", "--rank", r) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    single = rewrite_cli(*common[:-2], "--out", tmp_path / "single")
    _, err = single.communicate(timeout=300)
    assert single.returncode == 0, err[-2000:]
    assert store_contents(tmp_path / "ranks") == store_contents(tmp_path / "single")


def test_server_dying_mid_run_stops_it_and_rerun_resumes(tmp_path, server, second_server):
    """Kill the server under a running rewrite: the run stops with one clear line; the re-run (another
    server, same model) finishes with nothing lost or duplicated, as if never interrupted."""
    inputs = write_captions(tmp_path / "caps.txt", CAPTIONS * 4)
    args = ["--engine", "openai", "--input", inputs, "--out", tmp_path / "store", "--pools", "coco", "human",
            "--shard-size", "4", "--batch-size", "2", "--max-in-flight", "1"]
    proc = rewrite_cli(*args, "--base-url", second_server.base_url)
    deadline = time.time() + 300
    while not list((tmp_path / "store").glob("*/shard-*.zst")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(second_server.proc.pid, signal.SIGKILL)  # the server dies, engine and all, no goodbye
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rewrite: error: openai engine: server {second_server.base_url} "
                                                   "failed 5 times"), err[-2000:]
    finished = len(list((tmp_path / "store").glob("*/shard-*.zst")))
    assert 1 <= finished < 12 * 2
    rerun = rewrite_cli(*args, "--base-url", server.base_url)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["shards_skipped"] == finished
    clean = rewrite_cli(*args[:5], tmp_path / "clean", *args[6:], "--base-url", server.base_url)
    _, err = clean.communicate(timeout=300)
    assert clean.returncode == 0, err[-2000:]
    assert store_contents(tmp_path / "store") == store_contents(tmp_path / "clean")


def test_unreachable_server_is_one_clear_error():
    with pytest.raises(ServerError, match=r"cannot list the models of http://127\.0\.0\.1:9/v1"):
        OpenAIEngine(["http://127.0.0.1:9/v1"])
