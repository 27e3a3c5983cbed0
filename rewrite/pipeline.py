"""The rewrite run: captions -> shards -> (engine, filter, retries) -> atomic shard files per pool.

Resumable: each (shard, pool) file is written once, complete; a re-run skips files that exist and redoes
the rest. Deterministic: prompts and sampling seeds are functions of (seed, pool, key, attempt), so a
redone shard comes out identical. Engines that sample with per-request seeds (vllm, openai, eda) give
the same output at any batch size; the hf engine draws a whole batch from one generator, so its batch
size is recorded in run.json and a resume with another one is refused. Multi-node: rank r of w takes
shards r, r+w, r+2w, ...
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from common.text import TEXT_RULES

from .config import RewriteConfig
from .engines import HFEngine, Request, make_engine, mix_seed
from .inputs import read_captions
from .pools import load_pool
from .prompt import build_prompt, draw_examples
from .quality import REASONS, clean_output, reject_reason
from .store import FORMAT_VERSION, shard_path, write_atomic, write_shard

RUN_KEYS = ("engine", "model", "pools", "seed", "rewrites_per_pool", "shard_size", "num_captions", "batch_size",
            "vllm_dtype", "text_rules")
# Engines whose outputs depend on the batch a caption came in (no per-request seeds): run.json records
# their batch size and a resume with another one is refused.
BATCH_DEPENDENT_ENGINES = {HFEngine.name}


def vllm_dtype(cfg: RewriteConfig) -> str | None:
    """The dtype vLLM runs in when it is not the default (None): it changes the rewrites (bfloat16 even
    changes them with the batch), so run.json records it and a resume under another one is refused.
    --llm-kwargs '{dtype: ...}' wins; the CPU server path also reads LACLIP_VLLM_DTYPE (default float32)."""
    if cfg.engine != "vllm":
        return None
    from .engines import vllm_importable
    dtype = (cfg.llm_kwargs or {}).get("dtype")
    if vllm_importable():  # the offline API: vLLM's own default unless given
        return dtype
    dtype = dtype or os.environ.get("LACLIP_VLLM_DTYPE") or "float32"  # the CPU server's default
    return None if dtype == "float32" else dtype


def _check_run(out: Path, run: dict, complete: bool) -> None:
    """Write run.json on first use; refuse to mix a different run into an existing store. A complete store
    made under other text rules (common/text.py; run.json without "text_rules": rule 1) is left as it is:
    nothing would be written into it."""
    path = out / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        old.setdefault("text_rules", 1)  # stores from before run.json recorded it
        diff = [k for k in RUN_KEYS if old.get(k) != run.get(k)]
        if diff == ["text_rules"] and complete:
            return
        if diff:
            raise ValueError(f"{out} holds a different run "
                             f"({', '.join(f'{k}: {old.get(k)!r} != {run.get(k)!r}' for k in diff)}); "
                             "use another --out")
    else:
        write_atomic(path, json.dumps(run, indent=2) + "\n")


def rewrite_chunk(engine, chunk, pool, cfg: RewriteConfig, counts: dict) -> list[list[str]]:
    """Rewrites for a list of (key, caption): generate, filter, retry the rejected slots. A caption may
    end with fewer than n rewrites (EDA cannot change a one-word caption, say): the rest are counted as
    "unfilled", never padded with the original."""
    n = cfg.rewrites_per_pool
    examples = [draw_examples(pool, cfg.seed, key) if pool else [] for key, _ in chunk]
    prompts = [build_prompt(cap, ex) if pool else None for (_, cap), ex in zip(chunk, examples)]
    results: list[list[str]] = [[] for _ in chunk]
    todo = list(range(len(chunk)))
    for attempt in range(cfg.max_retries + 1):
        if not todo:
            break
        reqs = [Request(chunk[i][0], chunk[i][1], prompts[i],
                        mix_seed(cfg.seed, pool.name if pool else cfg.engine, chunk[i][0], attempt)) for i in todo]
        for i, outs in zip(todo, engine.generate(reqs, n)):
            for text in outs:
                text = clean_output(text)
                reason = reject_reason(text, chunk[i][1], examples[i], results[i])
                if reason:
                    counts[reason] += 1
                elif len(results[i]) < n:
                    results[i].append(text)
                    counts["kept"] += 1
        todo = [i for i in todo if len(results[i]) < n]
    counts["unfilled"] += sum(n - len(results[i]) for i in todo)
    return results


def run(cfg: RewriteConfig, engine=None) -> dict:
    """Run (or resume) one rank's share of a rewrite job. Returns a summary dict."""
    start = time.perf_counter()
    captions = read_captions(cfg.input)
    out = Path(cfg.out)
    rank, world = cfg.resolved_rank()
    names = cfg.pool_names()
    pools = [load_pool(p) for p in cfg.pools] if cfg.engine not in ("eda", "backtranslate") else [None]
    num_shards = max(1, -(-len(captions) // cfg.shard_size))
    model = None if cfg.engine in ("eda", "backtranslate") else cfg.model
    run_info = {"format_version": FORMAT_VERSION, "engine": cfg.engine, "model": model, "pools": names,
                "seed": cfg.seed, "rewrites_per_pool": cfg.rewrites_per_pool, "shard_size": cfg.shard_size,
                "num_shards": num_shards, "num_captions": len(captions), "input": str(cfg.input),
                "max_retries": cfg.max_retries, "text_rules": TEXT_RULES}  # the filter's normaliser
    if cfg.engine in BATCH_DEPENDENT_ENGINES:
        run_info["batch_size"] = cfg.batch_size
    dtype = vllm_dtype(cfg)
    if dtype is not None:
        run_info["vllm_dtype"] = dtype
    _check_run(out, run_info, complete=all(shard_path(out, name, s).is_file() for s in range(num_shards)
                                           for name in names))

    mine = [s for s in range(num_shards) if s % world == rank]
    for s in mine:  # temp files of this rank's shards left by a killed run (other ranks' are theirs)
        for name in names:
            for prefix in ("", "."):  # common/io.py's temp names start with a dot; older runs' did not
                for tmp in (out / name).glob(f"{prefix}shard-{s:05d}.jsonl.*.tmp"):
                    tmp.unlink()
    todo = [(s, pool, name) for s in mine for pool, name in zip(pools, names)
            if not shard_path(out, name, s).is_file()]
    skipped = len(mine) * len(names) - len(todo)
    counts = {k: 0 for k in ("kept", *REASONS, "unfilled")}
    own_engine = todo and engine is None
    if own_engine:
        engine = make_engine(cfg.engine, cfg.model, batch_size=cfg.batch_size, threads=cfg.threads,
                             chat=cfg.chat, tensor_parallel_size=cfg.tensor_parallel_size, seed=cfg.seed,
                             llm_kwargs=cfg.llm_kwargs, base_urls=cfg.base_urls, max_in_flight=cfg.max_in_flight)
    try:
        done = _rewrite_shards(engine, todo, captions, cfg, out, counts, rank, world)
    finally:
        if own_engine:
            engine.close()
    seconds = time.perf_counter() - start
    generated = sum(counts[k] for k in ("kept", *REASONS))
    summary = {"rank": rank, "world_size": world, "shards_written": len(todo), "shards_skipped": skipped,
               "caption_pool_rewrites": done, "seconds": round(seconds, 3),
               # whole captions (every pool) per second
               "captions_per_s": round(done / len(names) / seconds, 4) if seconds else 0.0,
               "kept_fraction": round(counts["kept"] / generated, 4) if generated else None, "counts": counts}
    print(f"rewrite: rank {rank}/{world} wrote {len(todo)} shard files ({done} caption-pool rewrites), "
          f"skipped {skipped} finished, {seconds:.1f} s; kept {counts['kept']}, rejected "
          + ", ".join(f"{k} {counts[k]}" for k in REASONS) + f"; {counts['unfilled']} slots left without a rewrite",
          file=sys.stderr)
    return summary


def _rewrite_shards(engine, todo, captions, cfg: RewriteConfig, out: Path, counts: dict, rank: int,
                    world: int) -> int:
    """Rewrite and write each (shard, pool) of `todo`; adds to `counts`; returns caption-pool rewrites."""
    from tqdm import tqdm
    total = sum(len(captions[s * cfg.shard_size:(s + 1) * cfg.shard_size]) for s, _, _ in todo)
    bar = tqdm(total=total, unit="cap", desc=f"rewrite rank {rank}/{world}", disable=not cfg.progress,
               dynamic_ncols=True, file=sys.stderr)
    done, scorer = 0, None
    for s, pool, name in todo:
        shard = captions[s * cfg.shard_size:(s + 1) * cfg.shard_size]
        shard_counts = {k: 0 for k in counts}
        records = []
        for i in range(0, len(shard), cfg.batch_size):
            chunk = shard[i:i + cfg.batch_size]
            for (key, cap), rewrites in zip(chunk, rewrite_chunk(engine, chunk, pool, cfg, shard_counts)):
                records.append({"key": key, "caption": cap, "rewrites": rewrites})
            bar.update(len(chunk))
            done += len(chunk)
        header = {"engine": cfg.engine, "model": getattr(engine, "model_id", cfg.model), "pool": name,
                  "seed": cfg.seed, "shard": s, "num_captions": len(shard),
                  "rewrites_per_pool": cfg.rewrites_per_pool, "counts": shard_counts}
        if cfg.fidelity:  # each rewrite's similarity to its original, stored beside it (pack can filter)
            from .fidelity import MODEL_NAME, FidelityScorer, score_records
            scorer = scorer or FidelityScorer()
            score_records(scorer, records)
            header["fidelity_model"] = MODEL_NAME
        write_shard(out, name, s, header, records)
        for k, v in shard_counts.items():
            counts[k] += v
    bar.close()
    return done
