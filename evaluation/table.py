"""The results table in the paper's layout, for one run or a comparison of two.

Rows are protocols (zero-shot, few-shot, linear probe; with two runs, each run's row and their delta),
columns the datasets in the paper's order, then the others, the Average over all but ImageNet, and
ImageNet last, as the paper reports it apart. Retrieval sets get a table of their own.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from evaluation.datasets import PAPER_SETS

DISPLAY = {"food101": "Food-101", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "sun397": "SUN397",
           "cars": "Cars", "aircraft": "Aircraft", "dtd": "DTD", "pets": "Pets", "caltech101": "Caltech-101",
           "flowers": "Flowers", "stl10": "STL-10", "eurosat": "EuroSAT", "resisc45": "RESISC45",
           "gtsrb": "GTSRB", "country211": "Country211", "imagenet": "ImageNet", "fashion_mnist": "Fashion-MNIST",
           "mnist": "MNIST", "digits": "Digits"}
ROWS = (("zeroshot", "Zero-shot"), ("fewshot", "Few-shot 5w5s"), ("linear_probe", "Linear probe"))


def _columns(names) -> list[str]:
    """Paper order, then the other sets, ImageNet last."""
    names = list(dict.fromkeys(names))
    return ([n for n in PAPER_SETS if n in names] + [n for n in names if n not in PAPER_SETS and n != "imagenet"]
            + (["imagenet"] if "imagenet" in names else []))


def _value(results: dict, ds: str, proto: str):
    r = results.get(ds, {}).get(proto, {})
    return r.get("accuracy")


def markdown_table(results: dict, runs: list[tuple[str, dict]] | None = None) -> str:
    """Rows = protocol (x run), columns = datasets, Average (all but ImageNet), ImageNet last."""
    runs = runs or [("", results)]
    cols = _columns([d for _, r in runs for d in r])
    body = [c for c in cols if c != "imagenet"]
    head = ["Protocol"] + [DISPLAY.get(c, c) for c in body] + ["Average"] + (["ImageNet"] if "imagenet" in cols else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"   # noqa: E731
    for proto, label in ROWS:
        vals_by_run = []
        for run_name, res in runs:
            vals = [_value(res, c, proto) for c in body]
            if all(v is None for v in vals) and _value(res, "imagenet", proto) is None:
                continue
            got = [v for v in vals if v is not None]
            avg = float(np.mean(got)) if got and len(got) == len(vals) else None
            row = vals + [avg] + ([_value(res, "imagenet", proto)] if "imagenet" in cols else [])
            vals_by_run.append(row)
            lines.append("| " + " | ".join([f"{label} {run_name}".strip()] + [fmt(v) for v in row]) + " |")
        if len(vals_by_run) == 2:
            delta = [None if a is None or b is None else b - a for a, b in zip(*vals_by_run)]
            lines.append("| " + " | ".join([f"{label} delta"] + ["-" if d is None else f"{d:+.1f}" for d in delta])
                         + " |")
    retr = [(n, d, r["retrieval"]) for n, res in runs for d, r in res.items() if "retrieval" in r]
    if retr:
        keys = list(retr[0][2])
        lines += ["", "| Retrieval | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
        lines += ["| " + f"{d} {n}".strip() + " | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |"
                  for n, d, r in retr]
    return "\n".join(lines)


def read_result(path: str) -> dict:
    """An eval.py result JSON; a missing, unreadable or foreign file is a ValueError naming it."""
    try:
        report = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:  # UnicodeDecodeError included
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), dict):
        raise ValueError(f"{path}: not an eval.py result (no 'results' mapping)")
    return report


def compare(a_path: str, b_path: str) -> str:
    a, b = (read_result(p) for p in (a_path, b_path))
    return markdown_table({}, [("A", a["results"]), ("B", b["results"])]) + f"\n\nA = {a_path}\nB = {b_path}"
