"""Evaluate a frozen CLIP checkpoint: zero-shot, few-shot, linear probe and retrieval.

  python eval.py --checkpoint PATH [--model NAME] --datasets digits,fashion_mnist,captions:DIR \
      --data-root DIR --out results.json
  python eval.py --compare A.json B.json

The checkpoint is anything model/checkpoint.py loads (DeepSpeed dir, our export, an open_clip state dict
with --model). Image features are extracted once per (checkpoint, dataset, split) and cached on disk.
Protocols (all numbers in percent):
  zeroshot      class-name templates, ensembled as the mean of normalised text embeddings, renormalised;
                top-1, top-5 (>= 5 classes), mean per-class recall.
  fewshot       5-way 5-shot episodes on the test split (15 queries per class unless too few images):
                features centred with the train-split mean and L2-normalised, nearest class prototype;
                mean accuracy over episodes with a 95% confidence interval.
  linear_probe  L2-regularised multinomial logistic regression (evaluation/probe.py: scipy's L-BFGS-B on
                CPU, torch's L-BFGS on GPU) on standardised features; strength chosen on the val split
                (or 20% of train) by a coarse-to-fine log search with warm starts, then refit on
                train+val.
  retrieval     image-text sets: recall@K image->text and text->image, K from --recall_k (1 5 10).
The JSON holds the checkpoint's identity and config; a Markdown table in the paper's layout is printed.
This file is the command line only; the evaluation itself is the evaluation/ package (runner.py runs a
checkpoint over the sets, one file per protocol, features.py the feature cache, table.py the table).
"""
from __future__ import annotations

import os
import sys

import torch

from common.config import EXIT_USAGE
from evaluation.config import EvalConfig
from evaluation.runner import CheckpointError, run
from evaluation.table import compare


def _parse(argv) -> tuple[EvalConfig, list[str] | None]:
    """--config FILE, --set key=value and a --kebab-case flag per EvalConfig key (common/config.py);
    a bad key or value: one line on stderr, exit 2."""
    from common.config import build_parser, parse
    p = build_parser(EvalConfig, "eval.py", __doc__.split("\n")[0], flags="all")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="a table of two result JSONs")
    cfg, args = parse(EvalConfig, p, argv)
    return cfg, args.compare


def usage_error(err) -> int:
    print(f"eval.py: error: {err}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def main(argv=None) -> int:
    """A user's mistake (a missing file, an unknown or incomplete set, a launch without a rank) is one
    line on stderr and exit status 2, as common.config.fail, returned rather than raised."""
    from common.ranks import RankError
    from evaluation.datasets import DatasetError
    cfg, cmp = _parse(sys.argv[1:] if argv is None else argv)
    if cmp:
        try:
            print(compare(*cmp))
        except ValueError as err:
            return usage_error(err)
        return 0
    if not cfg.checkpoint:
        return usage_error("--checkpoint is required (or --compare A.json B.json)")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    try:
        report = run(cfg)
    except (CheckpointError, DatasetError, RankError) as err:
        return usage_error(err)
    print(report["table"])
    print(f"eval: {len(report['results'])} datasets, {sum(report['seconds'].values()):.1f}s -> "
          f"{', '.join(report.get('files', [cfg.out]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
