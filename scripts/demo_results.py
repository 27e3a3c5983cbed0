"""The demo's numbers, read from the files its stages wrote under <out>: the table's columns (which
number of which evaluation set), every method's per-seed results, curves and losses, and the chance level
of each column. scripts/demo_stats.py compares them; scripts/report.py renders them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scripts.demo_data import read_rows

SET_LABEL = {"openclipart": "OpenClipart", "emoji": "Emoji", "fashion_mnist": "F-MNIST"}


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def jsonl_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file a stage may not have written (then none)."""
    return read_rows(path) if path.is_file() else []


OTHER = "other words"  # in the headers of retrieval whose texts are worded otherwise than the captions
# the sets whose zero-shot classes a caption can teach: clip art's folders name what the images show; the
# emoji's classes are Unicode block names ("Dingbats"), which no caption says, so its column is marked and
# left out of the zero-shot headline
TAUGHT_BY_CAPTIONS = ("openclipart",)


def columns(datasets: list[str], other: list[str] = (), fmnist: bool = True) -> list[tuple[str, str, str, str]]:
    """(header, eval file kind, dataset name in eval.py's results, path of the number). `other`: the sets
    that also have retrieval with each image's other human text (scripts/demo.py, other_wording)."""
    cols = []
    for name in datasets:
        mark = "" if name in TAUGHT_BY_CAPTIONS else " (Unicode blocks)" if name == "emoji" else " (untaught)"
        cols.append((f"ZS {SET_LABEL.get(name, name)}{mark} top-1", "heldout", f"captions:heldout-{name}",
                     "zeroshot/top1"))
    for name in datasets:
        lab = SET_LABEL.get(name, name)
        cols.append((f"{lab} I→T R@5", "heldout", f"captions:heldout-{name}", "retrieval/image_to_text_R@5"))
        cols.append((f"{lab} T→I R@5", "heldout", f"captions:heldout-{name}", "retrieval/text_to_image_R@5"))
    for name in (n for n in datasets if n in other):
        lab = SET_LABEL.get(name, name)
        cols.append((f"{lab} {OTHER} I→T R@5", "heldout", f"captions:heldout-{name}-other",
                     "retrieval/image_to_text_R@5"))
        cols.append((f"{lab} {OTHER} T→I R@5", "heldout", f"captions:heldout-{name}-other",
                     "retrieval/text_to_image_R@5"))
    if fmnist:
        cols += [("F-MNIST ZS", "fmnist", "fashion_mnist", "zeroshot/top1"),
                 ("F-MNIST 5w5s", "fmnist", "fashion_mnist", "fewshot/accuracy"),
                 ("F-MNIST linear", "fmnist", "fashion_mnist", "linear_probe/accuracy")]
    return cols


def cfg_columns(cfg) -> list[tuple[str, str, str, str]]:
    return columns(cfg.datasets, cfg.other_wording, fmnist=getattr(cfg, "fmnist_max_per_split", 1) > 0)


def _get(results: dict, ds: str, path: str):
    x = results.get(ds, {})
    for part in path.split("/"):
        x = x.get(part) if isinstance(x, dict) else None
    return x


def collect(out: Path, cfg, methods: dict) -> dict:
    """method -> {"final": {header: [value of seed 0, 1, ...; None where missing]}, "curves": [per seed: [(step,
    {header: value})]], "loss": ...}. Lists are indexed by seed id: a missing seed stays a hole (None), so
    pairs by seed (scripts/demo_stats.py) never shift."""
    cols = cfg_columns(cfg)
    data = {}
    for method in cfg.methods:
        m = {"final": {c[0]: [] for c in cols}, "curves": [], "loss": [], "train_sps": [], "seeds": []}
        for seed in range(cfg.seeds):
            ev = out / "eval" / f"{method}-seed{seed}"
            steps_files = sorted(ev.glob("heldout-step-*.json"))
            final = {"heldout": load_json(steps_files[-1])["results"] if steps_files else {},
                     "fmnist": load_json(ev / "fashion_mnist.json")["results"]
                               if (ev / "fashion_mnist.json").is_file() else {}}
            for head, kind, ds, path in cols:
                m["final"][head].append(_get(final[kind], ds, path))
            m["curves"].append([(int(f.stem.split("-")[-1]),
                                 {h: _get(load_json(f)["results"], ds, path) for h, kind, ds, path in cols
                                  if kind == "heldout"}) for f in steps_files])
            rows = jsonl_rows(out / "runs" / f"{method}-seed{seed}" / "metrics.jsonl")
            m["loss"].append([(r["step"], r["loss"]) for r in rows])
            m["train_sps"] += [r["samples_per_s"] for r in rows[5:]]
            if steps_files:
                m["seeds"].append(seed)
        data[method] = m
    return data


def mean_std(values: list) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def chance_levels(cfg, sets: dict) -> dict[str, float]:
    """What a model that knows nothing scores in each column, in percent: zero-shot 1 / classes (those of
    the held-out split, which eval.py classifies into),
    recall@5 5 / candidates, Fashion-MNIST's 10 classes, 5-way few-shot 1 / 5."""
    chance = {"F-MNIST ZS": 10.0, "F-MNIST 5w5s": 20.0, "F-MNIST linear": 10.0}
    for head, _, name, path in cfg_columns(cfg):
        set_name = name.removeprefix("captions:heldout-")
        info = sets.get(set_name.removesuffix("-other"), {})
        images = info.get("other_wording") if set_name.endswith("-other") else info.get("heldout")
        classes = info.get("heldout_categories", info.get("categories"))  # eval.py's classes: the held-out's
        if path == "zeroshot/top1" and classes:
            chance[head] = 100.0 / classes
        elif "R@5" in path and images:
            chance[head] = 100.0 * min(5, images) / images
    return chance
