"""The rewrite store: what rewrite/ writes and loaders/ pack reads.

<out>/run.json                     the run: engine, model, pools (in store order), seed, shards, ...
<out>/<pool>/shard-00000.jsonl.zst line 1: header {"engine", "model", "pool", "seed", "shard", "counts",
                                   "fidelity_model" once scored, ...}
                                   then one {"key", "caption", "rewrites": [...], "scores": [...]} per
                                   caption, input order (a caption may have fewer rewrites than asked
                                   for; "scores": each rewrite's fidelity, rewrite/fidelity.py);
                                   zstd-compressed JSONL (plain `.jsonl` shards of older stores read too)
A shard file exists only when complete (written to a temp file, fsynced, renamed), so a re-run redoes
exactly the missing files. `load_rewrites` gives each key its rewrites in the run's pool order.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from common.io import parse_jsonl, write_atomic as _write_atomic

FORMAT_VERSION = 1


def write_atomic(path: Path, data: str | bytes) -> None:
    """Atomic and durable (common/io.py): the file exists only when complete, and its rename survives a crash."""
    _write_atomic(path, data, sync_dir=True)


def shard_path(out_dir, pool: str, shard: int) -> Path:
    """The shard's file: `.jsonl.zst` (what this version writes), or a plain `.jsonl` one if that exists."""
    path = Path(out_dir) / pool / f"shard-{shard:05d}.jsonl.zst"
    plain = path.with_suffix("")
    return plain if not path.is_file() and plain.is_file() else path


def write_shard(out_dir, pool: str, shard: int, header: dict, records: list[dict]) -> Path:
    import zstandard
    path = Path(out_dir) / pool / f"shard-{shard:05d}.jsonl.zst"
    lines = [json.dumps({"format_version": FORMAT_VERSION, **header}, ensure_ascii=False)]
    lines += [json.dumps(r, ensure_ascii=False) for r in records]
    text = "\n".join(lines) + "\n"
    write_atomic(path, zstandard.ZstdCompressor(level=19).compress(text.encode("utf-8")))
    return path


def read_run(out_dir) -> dict:
    path = Path(out_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} is not a rewrite store: {path} is missing")
    return json.loads(path.read_text())


def read_shard(path: Path) -> tuple[dict, list[dict]]:
    data = Path(path).read_bytes()
    if str(path).endswith(".zst"):
        import zstandard
        data = zstandard.ZstdDecompressor().decompress(data)
    # "\n" only: str.splitlines also splits at U+2028 and other separators a rewrite may hold
    lines = data.decode("utf-8").rstrip("\n").split("\n")
    header, *records = [row for _, row in parse_jsonl(lines, path)]
    if header.get("format_version") != FORMAT_VERSION or len(records) != header["num_captions"]:
        raise ValueError(f"{path}: bad header or {len(records)} records for {header.get('num_captions')}")
    return header, records


def missing_shards(out_dir) -> list[Path]:
    run = read_run(out_dir)
    return [shard_path(out_dir, p, s) for s in range(run["num_shards"]) for p in run["pools"]
            if not shard_path(out_dir, p, s).is_file()]


def iter_rewrites(out_dir, shards=None, min_fidelity: float | None = None, dropped: dict | None = None,
                  with_pools: bool = False) -> Iterator[tuple]:
    """(key, original caption, rewrites in pool order) for every caption, in input order (of the given
    shard numbers only, when `shards` is a collection of them). With `min_fidelity`, rewrites whose
    fidelity score (rewrite/fidelity.py) is below it are left out and counted per pool in `dropped`.
    with_pools: a fourth item, the pool of each rewrite."""
    run = read_run(out_dir)
    missing = missing_shards(out_dir)
    if missing:
        raise FileNotFoundError(f"rewrite store {out_dir} is incomplete: {len(missing)} shard files missing, "
                                f"first {missing[0]} (re-run the rewrite command to finish it)")
    for s in range(run["num_shards"]):
        if shards is not None and s not in shards:
            continue
        paths = [shard_path(out_dir, p, s) for p in run["pools"]]
        per_pool = [read_shard(path)[1] for path in paths]
        for rows in zip(*per_pool):
            key = rows[0]["key"]
            if any(r["key"] != key for r in rows):
                raise ValueError(f"{out_dir} shard {s}: pools disagree on key order at {key!r}")
            texts, pools = [], []
            for pool, path, row in zip(run["pools"], paths, rows):
                kept = row["rewrites"]
                if min_fidelity is not None:
                    if "scores" not in row:
                        raise ValueError(f"{path}: key {key!r} has no fidelity scores (score the store first: "
                                         f"python -m rewrite.fidelity {out_dir})")
                    kept = [t for t, score in zip(row["rewrites"], row["scores"]) if score >= min_fidelity]
                    if dropped is not None:
                        dropped[pool] = dropped.get(pool, 0) + len(row["rewrites"]) - len(kept)
                texts += kept
                pools += [pool] * len(kept)
            yield (key, rows[0]["caption"], texts, pools) if with_pools else (key, rows[0]["caption"], texts)


def load_rewrites(out_dir) -> dict[str, list[str]]:
    """key -> [rewrite, ...] (pool order of run.json; originals not included)."""
    return {key: rewrites for key, _, rewrites in iter_rewrites(out_dir)}


def filter_counts(out_dir) -> dict[str, int]:
    """Summed filter counts over all finished shard files."""
    run, total = read_run(out_dir), {}
    for s in range(run["num_shards"]):
        for p in run["pools"]:
            path = shard_path(out_dir, p, s)
            if path.is_file():
                for k, v in read_shard(path)[0].get("counts", {}).items():
                    total[k] = total.get(k, 0) + v
    return total


def import_laclip(csv_path, txt_paths: list, out_dir, shard_size: int = 10_000) -> Path:
    """LaCLIP's released rewrites -> a rewrite store. The CSV has `relative_image_path,caption`; each
    .txt has one rewrite per CSV row, line-aligned; each .txt becomes one pool named after its file."""
    from .inputs import read_captions
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    captions = read_captions(csv_path)
    sources = []
    for txt in map(Path, txt_paths):
        with open(txt, encoding="utf-8") as f:
            lines = f.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) != len(captions):
            raise ValueError(f"line count mismatch: {txt} has {len(lines)} lines but {csv_path} has "
                             f"{len(captions)} caption rows; the files must be line-aligned")
        sources.append((txt.stem, txt, lines))
    pools = [name for name, _, _ in sources]
    if len(set(pools)) != len(pools):
        raise ValueError(f"two rewrite files share a name: {pools}")
    num_shards = max(1, -(-len(captions) // shard_size))
    for s in range(num_shards):
        lo, hi = s * shard_size, min(len(captions), (s + 1) * shard_size)
        for name, txt, lines in sources:
            header = {"engine": "laclip-import", "model": None, "pool": name, "seed": None,
                      "shard": s, "num_captions": hi - lo, "source": str(txt)}
            records = [{"key": k, "caption": c, "rewrites": [lines[i].strip()]}
                       for i, (k, c) in enumerate(captions[lo:hi], lo)]
            write_shard(out_dir, name, s, header, records)
    run = {"format_version": FORMAT_VERSION, "engine": "laclip-import", "model": None, "pools": pools,
           "seed": None, "rewrites_per_pool": 1, "shard_size": shard_size, "num_shards": num_shards,
           "num_captions": len(captions), "input": str(csv_path)}
    write_atomic(out_dir / "run.json", json.dumps(run, indent=2) + "\n")
    return out_dir

