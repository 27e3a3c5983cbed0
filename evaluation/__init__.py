"""Evaluation of frozen CLIP checkpoints; eval.py is its command line, train.py's periodic zero-shot uses it.

  datasets.py    evaluation sets on disk (class names, templates, splits)
  benchmark_sets.py  CLIP_benchmark's other names (imagenetv2, voc2007, mscoco_captions, wds/*, vtab/*, ...)
  features.py    CLIP's eval transform, image/text features, the feature cache
  zeroshot.py    fewshot.py    probe.py (linear probe)    retrieval.py    one protocol each
  runner.py      a checkpoint over the sets: every protocol, the JSON report (settings in config.py)
  table.py       the Markdown table of one run or two;  clip_benchmark.py  CLIP_benchmark's file format
"""
from evaluation import benchmark_sets  # noqa: F401  registers its names in datasets.py before any use
