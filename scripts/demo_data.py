"""Demo stage 1, data: the embedded image sets built by packing.builders, the fixed held-out split, the
training rows of every set in one captions.jsonl, and the held-out images' other human texts as a second
retrieval query set. Also the JSONL helpers every stage uses."""
from __future__ import annotations

import json
import time
from pathlib import Path

from common.io import read_jsonl, write_atomic
from scripts.demo_config import DemoConfig


def read_rows(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(path)]


def write_rows(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def stage_data(cfg: DemoConfig, out: Path) -> dict:
    """Image folders per set; <out>/data/train/captions.jsonl (the training rows of every set, absolute
    image paths) and <out>/data/heldout-<set>/captions.jsonl (eval.py's captions:<dir> sets)."""
    from packing.builders import build_dataset, default_cache

    cache = Path(cfg.data_cache or default_cache())
    train_rows, result = [], {"sets": {}}
    for name in cfg.datasets:
        # the full 256 px build is the one every other tool caches; smaller or subsampled builds get
        # their own folder so they never overwrite it
        full = cfg.max_samples is None and cfg.build_image_size == 256
        folder = cache / (name if full else f"{name}-{cfg.build_image_size}-n{cfg.max_samples}")
        t = time.time()
        build_dataset(name, str(folder), max_samples=cfg.max_samples, image_size=cfg.build_image_size,
                      seed=0, heldout_fraction=cfg.heldout_fraction, workers=2)
        rows = read_rows(folder / "captions.jsonl")
        for r in rows:
            r["file"] = str((folder / r["file"]).resolve())
        held = [r for r in rows if r["split"] == "test"]  # not "duplicate": held-out repeats are set aside
        train = [r for r in rows if r["split"] == "train"]
        train_rows += train
        write_rows(out / "data" / f"heldout-{name}" / "captions.jsonl", held)
        result["sets"][name] = {"folder": str(folder), "train": len(train), "heldout": len(held),
                                "categories": len({r["category"] for r in rows}),
                                "heldout_categories": len({r["category"] for r in held}),
                                "seconds": round(time.time() - t, 1)}
        print(f"  {name}: {len(train)} train + {len(held)} held-out samples, "
              f"{result['sets'][name]['categories']} categories ({folder})")
        if name in cfg.other_wording:
            other = other_wording_rows(held)
            if len(other) >= 10:  # fewer candidates: recall@5 says little
                write_rows(out / "data" / f"heldout-{name}-other" / "captions.jsonl", other)
                result["sets"][name]["other_wording"] = len(other)
                print(f"    + {len(other)} held-out images with another human text as the retrieval query "
                      f"(heldout-{name}-other)")
    write_rows(out / "data" / "train" / "captions.jsonl", train_rows)
    result["train"] = len(train_rows)
    return result


def other_wording_rows(held: list[dict]) -> list[dict]:
    """The held-out rows that have another human text (alt_texts, packing/builders.py), with that text as
    their caption: the last one (clip art: the keywords; emoji: an alias). Methods all train on the
    captions' wording; this asks whether the embedding holds up when the text is worded otherwise. A text
    repeated by an earlier row is left out (a retrieval tie)."""
    rows, seen = [], set()
    for r in held:
        texts = list((r.get("alt_texts") or {}).values())
        if texts and texts[-1].lower() not in seen:
            seen.add(texts[-1].lower())
            rows.append({**r, "caption": texts[-1]})
    return rows
