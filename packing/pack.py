"""Pack an image-text source into FFCV .beton and DALI webdataset shards (layout: docs/packed-format.md).

    python -m packing --input <dataset name | image folder | laclip.csv | tars> --out <dir>
        [--rewrites <rewrite store dir or rewrites.jsonl>] [--max-side 256] [--quality 90] [--keep-images]
        [--samples-per-shard 5000] [--workers 2] [--rank R --world-size W] [--config configs/pack.yaml]

Three stages, each resumable (a finished file is never redone, a half-written one is never seen):
  1. stage (per shard, spread over ranks): decode, resize, JPEG-encode in a process pool; broken images are
     reported with key and file and skipped. Writes staging/part-XXXXX.tar (+ .json manifest, last).
  2. captions (every rank, once every shard is staged): the join of samples and rewrites by key, sharded
     over the ranks by key hash (packing.join), and one caption-store shard per pack shard, written by the
     rank that owns it; rank 0 then writes the store manifest, keys.txt and plan.json (global indices, last).
  3. finalize (per shard, spread over ranks): ffcv/part-XXXXX.beton and dali/part-XXXXX.tar + .idx, both
     carrying the store's compressed record of each sample; shards/part-XXXXX.json (sizes, sha256) last.
  meta.json is written when every shard is final; then staging/ is removed.
Global indices are only known once every shard has dropped its broken images, hence the split in stages.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
import zlib
from typing import Iterator, NamedTuple

import numpy as np
from tqdm import tqdm

from packing import join
from packing.builders import check_source, open_source
from packing.caption_writer import save_dictionary, write_manifest, write_shard
from packing.images import BrokenImage, atomic_write_bytes, prepare_jpeg
from packing.ingest import IngestError, IngestReport, Sample, expand_shards, find_captions_file, iter_webdataset
from loaders.caption_codec import DICTIONARY, MAX_STYLES, StoreError, read_dictionary
from loaders.caption_store import CaptionStore
from loaders.packed import (FORMAT_VERSION, IDX_VERSION, PackError, file_entry, record_crc_file, shard_name,
                            verify_pack)
from common.config import option
from common.io import atomic_open, atomic_path, is_temp
from common.text import TEXT_RULES
from model.tokenizer import has_tokens

__all__ = ["PackConfig", "pack", "verify_pack", "PackError", "load_rewrites", "main"]  # the read side: loaders.packed


@dataclasses.dataclass
class PackConfig:
    input: str = option("", help="source: image folder, LaCLIP CSV, WebDataset tars (brace/glob patterns), or a "
                        "builder name")
    out: str = option("", help="packed dataset directory (re-running with the same out resumes)")
    rewrites: str | None = option(None, help="rewrite store or JSONL of {key, rewrites} (python -m rewrite)")
    min_fidelity: float | None = option(None, help="drop rewrites scoring below this fidelity (a scored rewrite "
                                        "store, or a JSONL whose rows carry \"scores\")")
    image_root: str | None = option(None, help="LaCLIP CSV: images are relative to this (default: the CSV's folder)")
    data_root: str | None = option(None, help="where builders (openclipart, emoji) cache their image folders")
    max_side: int = option(256, help="short side at most this many pixels")
    quality: int = option(90, help="JPEG quality of re-encoded images")
    keep_images: bool = option(False, help="pass colour JPEGs through untouched")
    samples_per_shard: int = option(5000, help="samples per output shard (tar inputs: one output shard per input "
                                    "tar instead)")
    max_samples: int | None = option(None, help="stop after this many samples (default: all)")
    workers: int = option(2, help="image worker processes per rank")
    rank: int | None = option(None, help="this rank (default: the launcher's $RANK / SLURM, else 0)")
    world_size: int | None = option(None, help="number of ranks (default: the launcher's, else 1)")
    wait_s: float = option(0.0, help="how long a rank waits for the others between stages (0: exit, re-run later)")
    keep_staging: bool = option(False, help="keep the staged parts after the final shards are written")


# ---------------------------------------------------------------- settings each stage depends on
def stage_settings(cfg: PackConfig) -> dict:
    """What the staged images depend on: a staged part made under other settings is restaged."""
    return {"format_version": FORMAT_VERSION, "input": cfg.input, "image_root": cfg.image_root,
            "max_side": cfg.max_side, "quality": cfg.quality, "keep_images": cfg.keep_images,
            "samples_per_shard": cfg.samples_per_shard, "max_samples": cfg.max_samples}


def caption_settings(cfg: PackConfig) -> dict:
    """What the caption store, keys and final shards depend on: the staged parts plus the rewrites."""
    rewrites = None
    if cfg.rewrites:
        st = os.stat(cfg.rewrites)  # a rewritten file (same path, new content) is another input
        rewrites = {"path": os.path.abspath(cfg.rewrites), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    # join_rules 2: rewrites equal to their original caption are dropped (1 kept them); text_rules: what
    # "equal" means (common/text.py)
    return {**stage_settings(cfg), "rewrites": rewrites, "join_rules": 2, "text_rules": TEXT_RULES,
            "min_fidelity": cfg.min_fidelity}


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new), key=str)
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def remove_temp_files(out: str) -> int:
    """Remove the temporary files a killed run left in `out` and its stage folders; returns how many."""
    removed = 0
    for folder in ("", "staging", "captions", "shards", "ffcv", "dali", "checksums"):
        path = os.path.join(out, folder)
        if os.path.isdir(path):
            for name in os.listdir(path):
                if is_temp(name):
                    os.remove(os.path.join(path, name))
                    removed += 1
    return removed


def _other_files(out: str) -> dict:
    """Sizes and sha256 of the files beside the shards (keys, caption store), for verify_pack."""
    rels = ["keys.txt"] + sorted(f"captions/{n}" for n in os.listdir(os.path.join(out, "captions")) if not is_temp(n))
    return {k: v for rel in rels for k, v in file_entry(out, rel).items()}


def _remove_other_shards(out: str, names: set[str]) -> None:
    """Shard files of an earlier run under other settings that this pack does not list (fewer shards)."""
    for folder in ("shards", "ffcv", "dali", "checksums"):
        path = os.path.join(out, folder)
        for name in os.listdir(path) if os.path.isdir(path) else ():
            if name.startswith("part-") and name.split(".")[0] not in names:
                os.remove(os.path.join(path, name))


def _json_or_none(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def _current(path: str, key: str) -> bool:
    """A stage's output exists and was made under the settings `key` (else: redo it)."""
    done = _json_or_none(path)
    return done is not None and done.get("settings") == key


# ---------------------------------------------------------------- units of work
def iter_units(cfg: PackConfig) -> Iterator[tuple[int, IngestReport, Iterator[Sample] | list[Sample]]]:
    """(shard index, its reader report, its samples). Tar inputs: one shard per input tar, read only by the
    rank that owns it. Other inputs: consecutive chunks of samples_per_shard of the (cheap) caption stream."""
    spec = cfg.input
    is_tars = not (spec in _builders() or spec.endswith((".csv", ".jsonl"))
                   or (os.path.isdir(spec) and find_captions_file(spec)))
    if is_tars:
        if cfg.max_samples is not None:
            raise PackError("--max-samples is not supported for tar inputs (shards map 1:1 to input tars)")
        for i, tar in enumerate(expand_shards(spec)):
            report = IngestReport()
            yield i, report, (iter_webdataset(tar, report) if i % cfg.world_size == cfg.rank else None)
        return
    router = _RoutingReport()
    stream = open_source(spec, router, image_root=cfg.image_root, data_root=cfg.data_root,
                         max_samples=cfg.max_samples)
    for i in itertools.count():
        router.target = IngestReport()
        chunk = list(itertools.islice(stream, cfg.samples_per_shard))
        if not chunk and i > 0 and not router.target.counts:
            return  # (an empty last chunk is still staged when it holds skip reports, so they are counted)
        yield i, router.target, (chunk if i % cfg.world_size == cfg.rank else None)
        if len(chunk) < cfg.samples_per_shard:
            return


class _RoutingReport(IngestReport):
    """Reader skips are counted in the report of the shard being filled."""

    def __init__(self):
        super().__init__()
        self.target = IngestReport()

    def skip(self, *args, **kwargs):
        self.target.skip(*args, **kwargs)


def _builders():
    from packing.builders import BUILDERS

    return BUILDERS


# ---------------------------------------------------------------- stage 1: images
def _prepare(job):
    key, caption, image, path, source, max_side, quality, keep = job
    try:
        data = image if image is not None else open(path, "rb").read()
        jpeg, h, w = prepare_jpeg(data, max_side, quality, keep)
    except (BrokenImage, OSError) as e:
        return None, f"{type(e).__name__}: {e}"
    return (jpeg, h, w), None


class StagedImage(NamedTuple):
    """One sample of a staged shard."""
    key: str
    caption: str
    jpeg: bytes
    height: int
    width: int
    rewrite_key: str  # the key its rewrites are joined on


def stage_shard(cfg: PackConfig, index: int, report: IngestReport, samples, pool, bar) -> dict:
    kept = []
    samples = iter(samples)
    # bounded batches: Pool.imap would pull a whole input tar's raw images into memory at once
    while batch := list(itertools.islice(samples, 64 * max(1, cfg.workers))):
        jobs = [(s.key, s.caption, s.image, s.path, s.source, cfg.max_side, cfg.quality, cfg.keep_images)
                for s in batch]
        for s, (result, err) in zip(batch, pool.map(_prepare, jobs, chunksize=8)):
            if err is not None:
                report.skip("broken_image", s.key, s.source, err)
                continue
            jpeg, height, width = result
            kept.append(StagedImage(s.key, s.caption, jpeg, height, width, s.meta.get("rewrite_key", s.key)))
        bar.update(len(batch))
    return write_staged(cfg.out, index, kept, report, settings_key(stage_settings(cfg)))


# ---------------------------------------------------------------- stage 2: captions
DICTIONARY_SAMPLES = 100_000  # caption-store dictionary: trained on shard 0's first samples, whatever W


class CaptionStage:
    """Stage 2 on one rank: this rank's share of the caption join (packing.join: scatter by key hash, join
    its partition, gather its shards' texts) and of the caption store (one store shard per pack shard it
    owns); then rank 0 writes the store manifest, keys.txt and plan.json (last). run() takes the steps in
    order. Each step leaves a marker (staging/join/<step>.<rank>.json, under the settings key: markers of
    a run under other settings do not count), so a re-run skips finished steps; run() returns False while
    other ranks have not reached a step this one waits for."""

    def __init__(self, cfg: PackConfig, num_shards: int):
        self.cfg, self.num_shards = cfg, num_shards
        self.world, self.rank = cfg.world_size, cfg.rank
        self.folder = os.path.join(cfg.out, "staging", "join")
        self.store_dir = os.path.join(cfg.out, "captions")
        self.mine = [i for i in range(num_shards) if i % self.world == self.rank]
        self.key = settings_key(caption_settings(cfg))
        os.makedirs(self.folder, exist_ok=True)

    def run(self) -> bool:
        if not self._finished("scatter"):
            self.scatter()
        if not self._all_finished("scatter"):
            return False
        self.read_scatter()
        if not self._finished("join"):
            self.join_partition()
        if not self._all_finished("join"):
            return False
        self.read_join()
        if not self._finished("store") and not self.write_store_shards():
            return False
        if self.rank != 0:
            return True
        if not self._all_finished("store"):
            return False
        self.write_plan()
        return True

    # ------------------------------------------------------------ the steps, in order
    def scatter(self) -> None:
        """Read this rank's staged captions and scatter them, with the rewrites, by key hash."""
        if self.rank == 0:
            self._drop_store_of_other_settings()
        tally = {"sizes": {}, "skipped": {}, "skipped_records": []}
        low, styles = join.scatter(self.folder, self.rank, self.world, self.cfg.rewrites, self._staged(tally),
                                   PackError, self.cfg.min_fidelity)
        self._finish("scatter", {**tally, "low_fidelity_dropped": low, "styles": styles})

    def read_scatter(self) -> None:
        """Every rank's scatter: the shard sizes and the pack's style names (sorted: the same on every
        rank; a text carries its style's id + 1, 0 = none)."""
        self.scatters = self._load("scatter")
        self.sizes = {int(i): n for m in self.scatters for i, n in m["sizes"].items()}
        self.style_names = sorted({s for m in self.scatters for s in m["styles"]})
        if len(self.style_names) > MAX_STYLES:
            raise PackError(f"{self.cfg.rewrites}: {len(self.style_names)} rewrite styles, at most {MAX_STYLES} "
                            "fit a record")
        self.style_byte = {name: i + 1 for i, name in enumerate(self.style_names)}
        if sum(self.sizes.values()) == 0:
            raise PackError(f"{self.cfg.out}: no usable samples in {self.cfg.input}")

    def join_partition(self) -> None:
        """Join this rank's key partition. A rewrite with no text left once cleaned is not a text to train
        on: dropped and counted."""
        world = self.world
        stats = join.join_partition(
            self.folder, self.rank, world, owner=lambda i: i % world, keep_text=has_tokens,
            staged_path=lambda i: os.path.join(self.cfg.out, "staging", shard_name(i) + ".json"), error=PackError)
        self._finish("join", stats)

    def read_join(self) -> None:
        """Every rank's join; rewrites given that match no sample at all stop every rank here."""
        self.joins = self._load("join")
        if self.cfg.rewrites and sum(m["rewrites_matched"] for m in self.joins) == 0:
            if self.rank == 0:
                shutil.rmtree(self.store_dir, ignore_errors=True)
            given = sum(m["rewrites_given"] for m in self.joins)
            some = next((m["some_rewrite_key"] for m in self.joins if m["some_rewrite_key"] is not None), None)
            sample = next(m["some_sample_key"] for m in self.joins if m["some_sample_key"] is not None)
            raise PackError(f"{self.cfg.rewrites}: none of its {given} keys matches a sample of {self.cfg.input} "
                            f"(its keys look like {some!r}, the samples' like {sample!r})")

    def write_store_shards(self) -> bool:
        """Gather this rank's shards' texts and write their caption-store shards (False: the dictionary
        rank 0 trains is not there yet)."""
        texts, styles = join.gather(self.folder, self.rank, self.world, {i: self.sizes[i] for i in self.mine},
                                    PackError)
        dictionary = self._dictionary(texts)
        if dictionary is None:
            return False
        entries, counts = {}, {"samples": 0, "with_rewrites": 0, "texts": 0, "max_texts": 0, "per_style": {}}
        for i in self.mine:
            if self.sizes[i]:  # a shard whose images were all broken gets no files
                entries[i] = write_shard(self.store_dir, i, texts[i], dictionary,
                                         styles=[[self.style_byte.get(x, 0) for x in row] for row in styles[i]])
            _count_texts(counts, texts[i], styles[i])
        self._finish("store", {"entries": entries, "counts": counts})
        return True

    def write_plan(self) -> None:
        """Rank 0, O(#shards): the store manifest, keys.txt (a byte copy of per-shard key lists), the skip
        report, then plan.json (last: the global index of each shard's first sample)."""
        stores = self._load("store")
        entries = {int(i): e for m in stores for i, e in m["entries"].items()}
        dictionary = read_dictionary(os.path.join(self.store_dir, DICTIONARY))
        write_manifest(self.store_dir, [entries[i] for i in sorted(entries)], dictionary, level=12,
                       styles=self.style_names)
        shards, first = [], 0
        for i in range(self.num_shards):
            if self.sizes[i]:
                shards.append({"name": shard_name(i), "num_samples": self.sizes[i], "first_index": first})
                first += self.sizes[i]
        self._write_keys()
        counts = self._text_counts(stores)
        dropped = self._dropped_rewrites(counts)
        skipped = {}
        for m in self.scatters:
            _add_counts(skipped, m["skipped"])
        write_skip_report(self.cfg.out, [r for m in self.scatters for r in m.get("skipped_records", [])])
        plan = {"shards": shards, "num_samples": first, "text_counts": counts, "skipped": skipped,
                "styles": self.style_names, "rewrites_matched": sum(m["rewrites_matched"] for m in self.joins),
                "rewrites_given": sum(m["rewrites_given"] for m in self.joins), "dropped_rewrites": dropped,
                "settings": self.key}
        atomic_write_bytes(os.path.join(self.cfg.out, "plan.json"), json.dumps(plan, indent=1).encode())

    # ------------------------------------------------------------ what the steps use
    def _drop_store_of_other_settings(self) -> None:
        """A caption store made under other settings (or before they were recorded) is rebuilt."""
        settings_file = os.path.join(self.store_dir, "pack-settings.json")
        if os.path.isdir(self.store_dir) and not _current(settings_file, self.key):
            shutil.rmtree(self.store_dir)
        atomic_write_bytes(settings_file, json.dumps({"settings": self.key}).encode())

    def _staged(self, tally: dict) -> Iterator[tuple[int, dict]]:
        """This rank's staged shards (captions only), each counted in `tally` (sizes, skips) and its key
        list written, as the scatter reads them."""
        for i in self.mine:
            m = read_staged(self.cfg.out, i, captions_only=True)
            tally["sizes"][i] = len(m["keys"])
            _add_counts(tally["skipped"], m["skipped"])
            tally["skipped_records"].extend({**r, "shard": shard_name(i)} for r in m.get("skipped_records", []))
            atomic_write_bytes(self._keys_path(i), "".join(k + "\n" for k in m["keys"]).encode())
            yield i, m

    def _dictionary(self, texts: dict) -> bytes | None:
        """The store's dictionary: trained by rank 0 on its shard 0 (so it does not depend on the number
        of ranks), read by the others once it is there (None: not yet)."""
        path = os.path.join(self.store_dir, DICTIONARY)
        if self.rank == 0:
            return save_dictionary(self.store_dir, texts[0][:DICTIONARY_SAMPLES])
        if _wait_for([path], self.cfg, "caption dictionary"):
            return read_dictionary(path)
        return None

    def _write_keys(self) -> None:
        with atomic_open(os.path.join(self.cfg.out, "keys.txt"), "wb") as out:
            for i in range(self.num_shards):
                with open(self._keys_path(i), "rb") as f:
                    shutil.copyfileobj(f, out)

    def _text_counts(self, stores: list[dict]) -> dict:
        """plan.json's text_counts: every rank's store counts and join drops, summed (the drops reported)."""
        counts = {k: sum(m["counts"][k] for m in stores) for k in ("samples", "with_rewrites", "texts")}
        counts["max_texts"] = max(m["counts"]["max_texts"] for m in stores)
        counts["per_style"] = {}
        for m in stores:
            _add_counts(counts["per_style"], m["counts"]["per_style"])
        counts["empty_rewrites_dropped"] = sum(m["empty_rewrites_dropped"] for m in self.joins)
        counts["same_as_original_dropped"] = sum(m.get("same_as_original_dropped", 0) for m in self.joins)
        if self.cfg.min_fidelity is not None:  # per source (pool of a rewrite store, style of a JSONL)
            low = {}
            for m in self.scatters:
                _add_counts(low, m.get("low_fidelity_dropped", {}))
            counts["low_fidelity_dropped"] = low
            print(f"pack: dropped rewrites with fidelity below {self.cfg.min_fidelity}: "
                  + (", ".join(f"{pool} {n}" for pool, n in low.items()) or "none"), file=sys.stderr)
        if counts["same_as_original_dropped"]:
            print(f"pack: dropped {counts['same_as_original_dropped']} rewrite(s) that repeat their original "
                  "caption (not a rewrite; counted in plan.json text_counts)", file=sys.stderr)
        return counts

    def _dropped_rewrites(self, counts: dict) -> list[dict]:
        """The first 20 rewrites dropped as empty (file and key), reported."""
        dropped = [{"file": self.cfg.rewrites, "key": k} for m in self.joins for k in m["dropped_keys"]][:20]
        if dropped:
            print(f"pack: dropped {counts['empty_rewrites_dropped']} empty rewrite(s) (no text left after "
                  f"clean-up), e.g. {self.cfg.rewrites} key {dropped[0]['key']!r}", file=sys.stderr)
        return dropped

    # ------------------------------------------------------------ step markers
    def _marker(self, step: str, rank: int) -> str:
        return os.path.join(self.folder, f"{step}.{rank:04d}.json")

    def _keys_path(self, i: int) -> str:
        return os.path.join(self.folder, f"keys.{shard_name(i)}.txt")

    def _finished(self, step: str) -> bool:
        """This rank finished `step` under these settings."""
        return _current(self._marker(step, self.rank), self.key)

    def _finish(self, step: str, content: dict) -> None:
        atomic_write_bytes(self._marker(step, self.rank), json.dumps({**content, "settings": self.key}).encode())

    def _all_finished(self, step: str) -> bool:
        """Every rank finished `step` (waiting up to --wait-s for them)."""
        return _wait_for([self._marker(step, r) for r in range(self.world)], self.cfg, f"join step '{step}'",
                         lambda path: _current(path, self.key))

    def _load(self, step: str) -> list[dict]:
        """Every rank's marker of `step`, in rank order."""
        return [json.load(open(self._marker(step, r))) for r in range(self.world)]


def _count_texts(counts: dict, texts: list, styles: list) -> None:
    """Add one shard's texts to a rank's store counts: samples, those with rewrites, texts, the most texts
    of a sample, and the rewrites packed per style (after every drop)."""
    for row, named in zip(texts, styles):
        counts["samples"] += 1
        counts["with_rewrites"] += len(row) > 1
        counts["texts"] += len(row)
        counts["max_texts"] = max(counts["max_texts"], len(row))
        for x in named[1:]:
            counts["per_style"][x or "unnamed"] = counts["per_style"].get(x or "unnamed", 0) + 1


def _add_counts(total: dict, more: dict) -> None:
    for name, n in more.items():
        total[name] = total.get(name, 0) + n


# ---------------------------------------------------------------- stage 3: final shards
def finalize_shard(cfg: PackConfig, shard: dict, store) -> dict:
    staged = read_staged(cfg.out, int(shard["name"].split("-")[1]))
    first, n = shard["first_index"], shard["num_samples"]
    if len(staged["keys"]) != n:
        raise PackError(f"{cfg.out}/staging/{shard['name']}: {len(staged['keys'])} samples, plan says {n}")
    records = [store.record(first + j) for j in range(n)]
    files = {}
    crcs = np.array([(zlib.crc32(j), zlib.crc32(r)) for j, r in zip(staged["jpegs"], records)], dtype="<u4")
    atomic_write_bytes(os.path.join(cfg.out, record_crc_file(shard["name"])), crcs.tobytes())
    files.update(file_entry(cfg.out, record_crc_file(shard["name"])))
    files.update(write_dali_shard(cfg.out, shard["name"], staged, records, first))
    files.update(write_ffcv_shard(cfg.out, shard["name"], staged, records, first, cfg.quality, cfg.workers))
    done = {**shard, "files": files, "settings": settings_key(caption_settings(cfg))}
    atomic_write_bytes(os.path.join(cfg.out, "shards", shard["name"] + ".json"), json.dumps(done).encode())
    return done


# ---------------------------------------------------------------- file formats
def _stage_paths(out: str, index: int) -> tuple[str, str]:
    base = os.path.join(out, "staging", shard_name(index))
    return base + ".bin", base + ".json"


SKIP_REPORT = "skipped.jsonl"


def write_skip_report(out: str, records: list[dict]) -> None:
    """<out>/skipped.jsonl: one line per skipped sample (key, file, reason, detail, shard); it outlives the
    staging files. Each reader report keeps its first 1000 records; the counts in meta.json are complete."""
    lines = "".join(json.dumps({k: r.get(k, "") for k in ("key", "file", "reason", "detail", "shard")},
                               ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(os.path.join(out, SKIP_REPORT), lines.encode())


def write_staged(out: str, index: int, kept: list[StagedImage], report: IngestReport, settings: str) -> dict:
    """Staged shard: the JPEGs concatenated in one file + a manifest (written last) with offsets."""
    blob, manifest_path = _stage_paths(out, index)
    offsets = np.cumsum([0] + [len(s.jpeg) for s in kept]).tolist()
    atomic_write_bytes(blob, b"".join(s.jpeg for s in kept))
    manifest = {"keys": [s.key for s in kept], "captions": [s.caption for s in kept],
                "hw": [[s.height, s.width] for s in kept], "rewrite_keys": [s.rewrite_key for s in kept],
                "offsets": offsets, "skipped": dict(report.counts), "skipped_records": report.records,
                "settings": settings}
    atomic_write_bytes(manifest_path, json.dumps(manifest, ensure_ascii=False).encode())
    return manifest


def read_staged(out: str, index: int, captions_only: bool = False) -> dict:
    blob, manifest_path = _stage_paths(out, index)
    with open(manifest_path, encoding="utf-8") as f:
        m = json.load(f)
    if not captions_only:
        with open(blob, "rb") as f:
            data = f.read()
        if len(data) != m["offsets"][-1]:
            raise PackError(f"{blob}: {len(data)} bytes, manifest says {m['offsets'][-1]} (truncated?)")
        m["jpegs"] = [data[a:b] for a, b in zip(m["offsets"][:-1], m["offsets"][1:])]
    return m


def write_dali_shard(out: str, name: str, staged: dict, records: list[bytes], first: int) -> dict:
    """<key>.jpg, <key>.cap (compressed caption record), <key>.idx (global index) + DALI's index file."""
    tar_rel, idx_rel = f"dali/{name}.tar", f"dali/{name}.idx"
    tar_path, idx_path = os.path.join(out, tar_rel), os.path.join(out, idx_rel)
    os.makedirs(os.path.dirname(tar_path), exist_ok=True)
    lines = []
    with atomic_path(tar_path) as tmp, tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for j, (key, jpeg, record) in enumerate(zip(staged["keys"], staged["jpegs"], records)):
            parts = []
            for ext, data in (("jpg", jpeg), ("cap", record), ("idx", str(first + j).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
                # tar.offset is now past the data, padded to 512-byte blocks (headers may be several blocks)
                offset = tar.offset - (len(data) + 511) // 512 * 512
                parts.append(f"{ext} {offset} {info.size} {key}.{ext}")
            lines.append(" ".join(parts))
    atomic_write_bytes(idx_path, (f"{IDX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n").encode())
    return {**file_entry(out, tar_rel), **file_entry(out, idx_rel)}


def _encode_prejpeg(destination, value, malloc):
    """RGBImageField.encode for JPEG bytes we already have: FFCV's own encode takes pixels and would
    re-encode them; this writes the same 'jpg' mode metadata, so FFCV's reader decodes it as usual and the
    .beton holds byte-identical JPEGs to the DALI tar."""
    data, h, w = value
    destination["mode"] = 0  # ffcv.fields.rgb_image.IMAGE_MODES["jpg"]
    destination["height"], destination["width"] = h, w
    ptr, storage = malloc(len(data))
    storage[:] = np.frombuffer(data, np.uint8)
    destination["data_ptr"] = ptr


class _FfcvRows:
    def __init__(self, staged, records, first):
        self.staged, self.records, self.first = staged, records, first

    def __len__(self):
        return len(self.records)

    def __getitem__(self, j):
        h, w = self.staged["hw"][j]
        rec = np.frombuffer(self.records[j], np.uint8)
        return (self.staged["jpegs"][j], h, w), rec, len(rec), self.first + j


def write_ffcv_shard(out: str, name: str, staged: dict, records: list[bytes], first: int, quality: int,
                     workers: int) -> dict:
    from ffcv.fields import BytesField, IntField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    rel = f"ffcv/{name}.beton"
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = RGBImageField(write_mode="jpg", jpeg_quality=quality)
    image.encode = _encode_prejpeg  # instance attribute: the header still says RGBImageField
    largest = max(len(j) for j in staged["jpegs"]) + max(len(r) for r in records) + 64
    page_size = max(MIN_PAGE_SIZE, 1 << (4 * largest - 1).bit_length())  # a page must hold a sample
    fields = {"image": image, "record": BytesField(), "record_len": IntField(), "index": IntField()}
    with atomic_path(path) as tmp:
        writer = DatasetWriter(tmp, fields, page_size=page_size,
                               num_workers=max(1, min(workers, len(records) // 2000)))
        # each writer process leaves one partly filled page: small shards get one process
        writer.from_indexed_dataset(_FfcvRows(staged, records, first), chunksize=256)
    return file_entry(out, rel)


def load_rewrites(path: str) -> dict[str, list[str]]:
    """key -> rewrites in memory (small sets, inspection). A JSONL of {"key": ..., "rewrites": [...]}
    lines, or a rewrite store directory. Packing itself joins on disk (packing.join)."""
    from packing.join import iter_rewrite_rows

    out: dict[str, list[str]] = {}
    for key, texts in iter_rewrite_rows(path, PackError):
        out.setdefault(key, []).extend(texts)
    return out


def _wait_for(paths: list[str], cfg: PackConfig, what: str, ready=os.path.exists) -> bool:
    deadline = time.time() + cfg.wait_s
    while True:
        missing = [p for p in paths if not ready(p)]
        if not missing:
            return True
        if time.time() >= deadline:
            print(f"pack rank {cfg.rank}: waiting for {len(missing)} {what} (e.g. {missing[0]}) from other ranks; "
                  "re-run this command when they are done", file=sys.stderr)
            return False
        time.sleep(0.2)  # short: the ranks of a sharded join meet at several steps


def pack(cfg: PackConfig) -> dict:
    """Run every stage this rank can; returns a summary dict (also printed)."""
    if not cfg.input or not cfg.out:
        raise PackError("pack needs --input and --out")
    from common.ranks import resolve_ranks
    ranks = resolve_ranks(cfg.rank, cfg.world_size)
    cfg = dataclasses.replace(cfg, rank=ranks.rank, world_size=ranks.world_size)
    if cfg.rewrites and not os.path.exists(cfg.rewrites):
        raise PackError(f"{cfg.rewrites}: rewrites file not found")
    check_source(cfg.input)  # a URL, a missing file, a misspelt builder: before --out is made
    t0 = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    settings = caption_settings(cfg)
    stage_key, caption_key = settings_key(stage_settings(cfg)), settings_key(settings)
    if os.path.exists(os.path.join(cfg.out, "meta.json")):
        meta = verify_pack(cfg.out)
        if meta.get("settings") not in (None, settings):  # packs from before settings were recorded: trusted
            raise PackError(f"{cfg.out}: already packed with other settings "
                            f"({_differences(meta['settings'], settings)});"
                            " pack into a new --out, or delete it to repack")
        print(f"pack: {cfg.out} is complete ({meta['num_samples']} samples); nothing to do")
        return {"num_samples": meta["num_samples"], "skipped": meta.get("skipped", {}), "new_samples": 0,
                "complete": True}
    if cfg.world_size == 1:  # alone: any temporary file here is a killed run's leftover
        remove_temp_files(cfg.out)

    # stage 1
    ctx = multiprocessing.get_context("fork")
    staged_new, reports, num_shards = 0, IngestReport(), 0
    with ctx.Pool(max(1, cfg.workers)) as pool, tqdm(desc="pack: stage images", unit="img") as bar:
        for index, report, samples in iter_units(cfg):
            num_shards = index + 1
            if samples is None or _current(os.path.join(cfg.out, "staging", shard_name(index) + ".json"), stage_key) \
                    or _current(os.path.join(cfg.out, "shards", shard_name(index) + ".json"), caption_key):
                continue  # another rank's shard, or already staged under these settings
            m = stage_shard(cfg, index, report, samples, pool, bar)
            staged_new += len(m["keys"])
            reports.merge(report)
    staging = [os.path.join(cfg.out, "staging", shard_name(i) + ".json") for i in range(num_shards)]
    plan_path = os.path.join(cfg.out, "plan.json")

    # stage 2 (every rank: its share of the join and of the caption store; rank 0 writes plan.json last)
    if not _current(plan_path, caption_key):
        if not _wait_for(staging, cfg, "staged shards", lambda p: _current(p, stage_key)) \
                or not CaptionStage(cfg, num_shards).run() \
                or not _wait_for([plan_path], cfg, "caption plan", lambda p: _current(p, caption_key)):
            return {"staged": staged_new, "complete": False}
    with open(plan_path) as f:
        plan = json.load(f)

    # stage 3
    store = CaptionStore(os.path.join(cfg.out, "captions"))
    mine = [s for i, s in enumerate(plan["shards"]) if i % cfg.world_size == cfg.rank
            and not _current(os.path.join(cfg.out, "shards", s["name"] + ".json"), caption_key)]
    finalized = 0
    for shard in tqdm(mine, desc="pack: write ffcv + dali", unit="shard"):
        finalize_shard(cfg, shard, store)
        finalized += shard["num_samples"]
    done_paths = [os.path.join(cfg.out, "shards", s["name"] + ".json") for s in plan["shards"]]
    if not _wait_for(done_paths, cfg, "final shards", lambda p: _current(p, caption_key)):
        return {"staged": staged_new, "finalized": finalized, "complete": False}

    # meta.json last: the dataset exists from here on
    shards = []
    for p in done_paths:
        with open(p) as f:
            shards.append(json.load(f))
    meta = {"format_version": FORMAT_VERSION, "num_samples": plan["num_samples"],
            "image": {"max_side": cfg.max_side, "quality": cfg.quality, "keep_images": cfg.keep_images},
            "shards": shards, "keys_file": "keys.txt",
            "source": {"input": cfg.input, "rewrites": cfg.rewrites, "rewrites_given": plan["rewrites_given"],
                       "rewrites_matched": plan["rewrites_matched"]},
            "text_counts": plan["text_counts"], "styles": plan["styles"], "skipped": plan["skipped"],
            "settings": settings,
            "files": _other_files(cfg.out)}
    atomic_write_bytes(os.path.join(cfg.out, "meta.json"), json.dumps(meta, indent=1).encode())
    if cfg.rank == 0 and not cfg.keep_staging:
        shutil.rmtree(os.path.join(cfg.out, "staging"), ignore_errors=True)
    if cfg.rank == 0:  # every shard is final: nothing is being written any more
        remove_temp_files(cfg.out)
        _remove_other_shards(cfg.out, {s["name"] for s in shards})
    elapsed = time.time() - t0
    nbytes = sum(f["bytes"] for s in shards for f in s["files"].values())
    summary = {"complete": True, "num_samples": plan["num_samples"], "new_samples": staged_new,
               "finalized_samples": finalized,
               "skipped": plan["skipped"], "skipped_this_run": dict(reports.counts), "bytes": nbytes,
               "seconds": round(elapsed, 2), "samples_per_s": round(max(staged_new, finalized) / max(elapsed, 1e-9), 1),
               "skipped_examples": reports.records[:20]}
    print(f"pack: {plan['num_samples']} samples in {len(shards)} shards at {cfg.out}; "
          f"{sum(plan['skipped'].values())} skipped {plan['skipped']} (listed in {SKIP_REPORT}); "
          f"{nbytes / 2**20:.1f} MiB; "
          f"{summary['samples_per_s']} samples/s this run ({elapsed:.1f} s)")
    return summary




def parse_args(argv=None) -> PackConfig:
    """--config FILE, --set key=value and a --kebab-case flag per key; a bad key or value: one line, exit 2."""
    from common.config import build_parser, parse

    parser = build_parser(PackConfig, "python -m packing", __doc__.split("\n")[0], flags="all")
    return parse(PackConfig, parser, argv)[0]


def main(argv=None) -> dict:
    return pack(parse_args(argv))


def cli(argv=None) -> None:
    """`python -m packing`: a bad input or a damaged file is one line on stderr and exit status 2; an
    --out folder this run created and left empty is removed."""
    from common.config import fail
    from common.io import RemoteError
    from common.ranks import RankError

    cfg = parse_args(argv)
    created = bool(cfg.out) and not os.path.exists(cfg.out)
    try:
        pack(cfg)
    except (PackError, IngestError, StoreError, RankError, RemoteError) as e:  # a user's input or launch
        if created and _alone(cfg) and not _holds_samples(cfg.out):  # nothing a re-run could reuse
            shutil.rmtree(cfg.out, ignore_errors=True)
        fail("pack", e)


def _alone(cfg: PackConfig) -> bool:
    from common.ranks import RankError, resolve_ranks
    try:
        return resolve_ranks(cfg.rank, cfg.world_size).world_size == 1
    except RankError:
        return False


def _holds_samples(out: str) -> bool:
    """Some staged or final shard of `out` holds a sample (work a re-run resumes from)."""
    records = [_json_or_none(p) or {} for d in ("staging", "shards") for p in glob.glob(os.path.join(out, d, "*.json"))]
    return any(r.get("keys") or r.get("num_samples") for r in records)


if __name__ == "__main__":
    cli()
