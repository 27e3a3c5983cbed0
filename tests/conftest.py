"""What several test modules share: the repository root, real packs built once per session
(one memoised factory), the tiny rewrite model, and the `slow` marker's meaning.

`slow` (pyproject.toml) marks what takes over about 5 s on 2 CPU cores, measured with
`pytest --durations` (so `make test-fast` stays under 5 minutes): DeepSpeed launches, kill -9 and resume
runs, the end-to-end demo, the README's commands, a vLLM server, and the longest pack, loader and
evaluation checks (per-record checksums over every loader, clip_benchmark, a Fashion-MNIST probe, FFCV and
DALI runs that build several pipelines). `make test-fast` (pytest -m "not slow") leaves them out;
`make test` (CI) runs everything.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
# the rewrite tests' captions (and part of the tiny model's tokenizer training text)
CAPTIONS = ["a white dog running on the beach", "red car parked on a street", "Christmas light",
            "a bowl of fresh fruit on a table", "green arrow", "Baby Tux", "Simple Shovel",
            "a cartoon cat with a hat", "Blue Eye", "Ice cube", "Camera Icon", "Ironing Board"]


@pytest.fixture(scope="session")
def emoji_source(tmp_path_factory):
    """emoji_source(samples, rewrites, image_size=256) -> {root, folder, rows, rewrites}: `samples` real emoji
    images with their names as captions, and a rewrites JSONL holding rewrites(i, row) for row i (a list,
    maybe empty; None leaves the row out of the file). Built once per session per arguments."""
    from packing import builders
    built: dict = {}

    def make(samples: int, rewrites: Callable[[int, dict], list[str] | None], image_size: int = 256) -> dict:
        key = (samples, image_size, rewrites.__module__, rewrites.__qualname__)
        if key not in built:
            root = tmp_path_factory.mktemp("emoji")
            folder = builders.build_dataset("emoji", str(root / "emoji"), max_samples=samples,
                                            image_size=image_size, workers=1)
            rows = [json.loads(line) for line in Path(folder, "captions.jsonl").read_text().splitlines()]
            with open(root / "rewrites.jsonl", "w") as f:
                for i, row in enumerate(rows):
                    texts = rewrites(i, row)
                    if texts is not None:
                        f.write(json.dumps({"key": row["key"], "rewrites": texts}) + "\n")
            built[key] = {"root": root, "folder": folder, "rows": rows, "rewrites": str(root / "rewrites.jsonl")}
        return built[key]
    return make


@pytest.fixture(scope="session")
def make_pack(tmp_path_factory):
    """make_pack(**PackConfig fields but out) -> {out, cfg, summary}: a real pack in a session folder, built
    once per session per arguments (tests that damage a pack copy it first)."""
    from packing.pack import PackConfig, pack
    built: dict = {}

    def make(**fields) -> dict:
        key = json.dumps(fields, sort_keys=True, default=str)
        if key not in built:
            out = str(tmp_path_factory.mktemp("packed") / "ds")
            cfg = PackConfig(out=out, **fields)
            built[key] = {"out": out, "cfg": cfg, "summary": pack(cfg)}
        return built[key]
    return make


TEMPLATES = ["an emoji of {}", "{} icon", "a small colorful picture showing {}", "{}, drawn as a flat symbol"]


def template_rewrites(i: int, row: dict) -> list[str]:
    """0-4 rewrites per caption (row i gets i % 5), from caption templates."""
    return [t.format(row["caption"].lower()) for t in TEMPLATES[:i % 5]]


@pytest.fixture(scope="session")
def packed(emoji_source, make_pack):
    """95 real emoji images, captions = their names plus 0-4 rewrites each, packed into shards of 40
    (the loader tests' set; test_pack and the fault tests override `packed` with their own)."""
    source = emoji_source(96, template_rewrites)
    out = make_pack(input=source["folder"], rewrites=source["rewrites"], samples_per_shard=40, workers=1)["out"]
    assert len(json.loads(Path(out, "meta.json").read_text())["shards"]) >= 3
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """One tiny random Llama per test session, whichever module asks (so one shared vLLM server serves all)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def make_tiny_model(path: Path) -> str:
    """A randomly initialised 2-layer Llama (hidden size 128, head size 64, which vLLM's CPU attention
    supports) with a byte-level BPE tokenizer trained on the prompt pools and the test captions."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rewrite.models import import_transformers
    from rewrite.pools import DEFAULT_POOLS, load_pool
    from rewrite.prompt import TASK
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


def serve_folder(folder):
    """A real HTTP server on 127.0.0.1 serving `folder` from a thread (port: the free one the OS picks at
    bind); `.url` is its base URL, `.requests` the paths of its GET requests. Stop it with .shutdown()."""
    import functools
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the downloads are counted, not printed
            if self.command == "GET":
                self.server.requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    server.requests, server.url = [], f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
