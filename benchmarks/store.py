"""Caption store benchmark: bytes on disk against raw and zstd-compressed UTF-8, decode and tokenize rates.

    python -m benchmarks store --out store.json

Corpus: real captions available offline (openclipart titles, descriptions and keywords; emoji names).
Until a rewrite store is given (--rewrites), each sample holds up to --texts-per-sample real captions
as a stand-in for original + rewrites; with --rewrites DIR samples are original + their rewrites.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sysconfig
import tempfile
import time

import numpy as np
import zstandard

from benchmarks.common import parse_config, rate, write_json
from common.config import option
from benchmarks.corpus import clipart_captions, emoji_names
from loaders.caption_store import CaptionStore, store_bytes
from packing.caption_writer import write_store
from model.tokenizer import get_tokenizer


def reference_tokenizer():
    """open_clip's SimpleTokenizer module loaded alone (the rest of open_clip needs torchvision)."""
    path = os.path.join(sysconfig.get_paths()["purelib"], "open_clip", "tokenizer.py")
    spec = importlib.util.spec_from_file_location("reference_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def build_samples(texts_per_sample: int) -> list[list[str]]:
    captions = clipart_captions() + emoji_names()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(captions))
    samples, pos = [], 0
    while pos < len(order):
        k = int(rng.integers(1, texts_per_sample + 1))
        samples.append([captions[i] for i in order[pos:pos + k]])
        pos += k
    return samples


@dataclasses.dataclass
class StoreBenchOptions:
    out: str | None = option(None, help="where to write the JSON result")
    level: int = option(12, help="zstd level for the store and the baseline")
    texts_per_sample: int = option(5, help="texts stored per sample")
    seconds: float = option(1.0, help="time per measurement")


def main(argv: list[str]) -> dict:
    args = parse_config(StoreBenchOptions, "store", argv, __doc__)

    samples = build_samples(args.texts_per_sample)
    texts = [t for s in samples for t in s]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "captions")
        start = time.perf_counter()
        write_store(path, samples, level=args.level, progress=False)
        write_seconds = time.perf_counter() - start
        store = CaptionStore(path)
        n = len(store)
        bytes_per_sample = store_bytes(path) / n

        raw = [("\n".join(s)).encode() for s in samples]
        plain_zstd = zstandard.ZstdCompressor(level=args.level)
        zstd_bytes = sum(len(plain_zstd.compress(r)) for r in raw) / n

        rng = np.random.default_rng(0)
        indices = rng.integers(0, n, size=4096).tolist()

        def decode_batch() -> int:
            for i in indices:
                store.draw(i, seed=0, epoch=1)
            return len(indices)

        decode_rate = rate(decode_batch, args.seconds)

    tokenizer = get_tokenizer()
    tokenizer.encode(texts)  # the word table warms up on the corpus, as it would early in a pack
    batches = [texts[i:i + 4096] for i in range(0, len(texts), 4096)]
    tokenize_rate = rate(lambda: sum(len(tokenizer.encode(b)) for b in batches), args.seconds)
    reference = reference_tokenizer()
    reference_rate = rate(lambda: sum(1 for t in texts if reference.encode(t) is not None), args.seconds, 1)

    return write_json({
        "benchmark": "store",
        "num_samples": n,
        "texts_per_sample": len(texts) / n,
        "corpus": "openclipart titles/descriptions/keywords + emoji names (real, offline)",
        "zstd_level": args.level,
        "bytes_per_sample": bytes_per_sample,
        "raw_utf8_bytes_per_sample": sum(map(len, raw)) / n,
        "zstd_text_bytes_per_sample": zstd_bytes,
        "bytes_vs_zstd_text": bytes_per_sample / zstd_bytes,
        "write_samples_per_s": n / write_seconds,
        "decode_texts_per_s": decode_rate,
        "tokenize_texts_per_s": tokenize_rate,
        "reference_tokenize_texts_per_s": reference_rate,
        "tokenize_speedup": tokenize_rate / reference_rate,
    }, args.out)
