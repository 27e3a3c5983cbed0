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
  retrieval     image-text sets: recall@1/5/10 image->text and text->image.
The JSON holds the checkpoint's identity and config; a Markdown table in the paper's layout is printed.
This file is the command line only; the evaluation itself is the evaluation/ package (runner.py runs a
checkpoint over the sets, one file per protocol, features.py the feature cache, table.py the table).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch

from common.config import EXIT_USAGE
from evaluation.config import OUTPUT_FORMATS, PROTOCOLS, EvalConfig
from evaluation.runner import CheckpointError, run
from evaluation.table import compare


EVAL_KEYS_HELP = {
    "checkpoint": "an export directory (train.py's checkpoints/step-N/export), a .safetensors/.pt file, or an "
                  "open_clip state dict (needs model)",
    "model": "model/configs name, needed for open_clip state dicts",
    "datasets": "CLIP_benchmark-style dataset names (comma-separated on the command line)",
    "data_root": "where the datasets are (or are downloaded to)",
    "out": "result JSON; with format clip_benchmark a folder of one JSON per set and task",
    "format": "laclip (one JSON) | clip_benchmark (evaluation/clip_benchmark.py)",
    "protocols": "protocols to run (comma-separated on the command line)",
    "cache_dir": "feature cache directory ('' = none)",
    "batch_size": "images per forward",
    "workers": "data loader workers",
    "device": "auto (cuda when present) | cpu | cuda | cuda:N",
    "max_per_split": ">0: a fixed subsample of each split (quick CPU runs)",
    "fewshot_ways": "few-shot: classes per episode",
    "fewshot_shots": "few-shot: labelled examples per class",
    "fewshot_queries": "few-shot: queries per class",
    "fewshot_episodes": "few-shot: episodes averaged",
    "seed": "seed of subsampling, episodes and the probe's split",
    "probe_val_fraction": "linear probe: training fraction held out to pick the regularisation",
    "probe_max_iter": "linear probe: solver iterations",
}


def _parse(argv) -> tuple[EvalConfig, list[str] | None]:
    """--config FILE, --set key=value and a --kebab-case flag per EvalConfig key (common/config.py);
    a bad key or value: one line on stderr, exit 2."""
    from common.config import as_dict, build_parser, parse, with_help
    keys = with_help(EvalConfig, EVAL_KEYS_HELP, choices={"format": OUTPUT_FORMATS, "protocols": PROTOCOLS})
    p = build_parser(keys, "eval.py", __doc__.split("\n")[0], flags="all")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="a table of two result JSONs")
    cfg, args = parse(keys, p, argv)
    return EvalConfig(**as_dict(cfg)), args.compare


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
