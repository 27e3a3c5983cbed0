"""What the rewrite tests share: a tiny real Llama, caption files, a real vLLM server, store comparison.

The tiny model is a randomly initialised 2-layer Llama (hidden size 128, head size 64, which vLLM's CPU
attention supports) with a byte-level BPE tokenizer trained here: its rewrites are random text, so the
tests check mechanics (seeds, files, resume, servers), not quality. The vLLM server is the project's own
CPU engine (rewrite.vllm_server) from .venv-vllm, started once per test session on 127.0.0.1.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rewrite.pools import DEFAULT_POOLS, load_pool
from rewrite.prompt import TASK
from rewrite.store import filter_counts, iter_rewrites, read_run

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a white dog running on the beach", "red car parked on a street", "Christmas light",
            "a bowl of fresh fruit on a table", "green arrow", "Baby Tux", "Simple Shovel",
            "a cartoon cat with a hat", "Blue Eye", "Ice cube", "Camera Icon", "Ironing Board"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def make_tiny_model(path: Path) -> str:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from rewrite.models import import_transformers
    tr = import_transformers()
    texts = [p for name in DEFAULT_POOLS for pair in load_pool(name).pairs for p in pair] + CAPTIONS + [TASK]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = tr.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    tr.LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


_tiny: list[str] = []


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """One tiny model per test session, whichever test module asks (so one shared server serves all)."""
    if not _tiny:
        _tiny.append(make_tiny_model(tmp_path_factory.mktemp("tiny-llama")))
    return _tiny[0]


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
