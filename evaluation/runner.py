"""Running a checkpoint over evaluation sets: the protocols of one set, then every set and the report.

`evaluate_set` extracts (or reads from the cache) the features of each split once and hands them to the
protocols asked for (evaluation/zeroshot.py, fewshot.py, probe.py, retrieval.py); a protocol a set cannot
run (few-shot with too few images per class, a probe without a train split) is recorded as skipped
rather than failing the run. `run` loads the checkpoint, evaluates its share of the sets (one share per
rank under a multi-process launch) and writes one JSON holding the checkpoint's identity, the settings and
the results, atomically, so a present file is a finished evaluation.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from common.io import write_json_atomic
from evaluation.config import EvalConfig
from evaluation.datasets import EvalSet, open_eval_set
from evaluation.features import cache_file, checkpoint_identity, encode_texts, extract_features, subsample
from evaluation.fewshot import fewshot
from evaluation.probe import linear_probe
from evaluation.retrieval import retrieval
from evaluation.table import markdown_table
from evaluation.zeroshot import zeroshot, zeroshot_classifier

FORMAT, FORMAT_VERSION = "laclip-eval", 1


def evaluate_set(model, ds: EvalSet, cfg: EvalConfig, ckpt_key: str, device: str) -> dict:
    """The protocols of cfg on one set, from features extracted once per split (cached under ckpt_key)."""
    size = int(model.image_size)
    taken = {k: subsample(v, cfg.max_per_split, cfg.seed) for k, v in ds.splits.items()}
    splits = {k: v[0] for k, v in taken.items()}
    feats = {}
    for name, split in splits.items():
        cache = cache_file(cfg.cache_dir, ckpt_key, ds, name, split, max_per_split=cfg.max_per_split,
                           seed=cfg.seed, size=size)
        feats[name] = extract_features(model, split, size=size, device=device, batch_size=cfg.batch_size,
                                       workers=cfg.workers, cache=cache, desc=f"{ds.name}/{name}",
                                       progress=cfg.progress)
    test_x, test_y = feats["test"], splits["test"].labels
    out = {"n_test": int(len(test_y)), "n_classes": len(ds.class_names), "metric": ds.metric}
    if not ds.class_names:                      # a retrieval-only set (e.g. flickr30k)
        cfg = dataclasses.replace(cfg, protocols=[p for p in cfg.protocols if p == "retrieval"])
    if "zeroshot" in cfg.protocols:
        out["zeroshot"] = zeroshot(test_x, test_y, zeroshot_classifier(model, ds.class_names, ds.templates, device))
        out["zeroshot"]["accuracy"] = out["zeroshot"]["top1" if ds.metric == "accuracy" else "mean_per_class"]
    if "retrieval" in cfg.protocols and ds.captions is not None:
        kept = {int(i): j for j, i in enumerate(taken["test"][1])}      # image index -> row in test_x
        owner = ds.caption_image if ds.caption_image is not None else range(len(ds.captions))
        pairs = [(text, kept[i]) for text, i in zip(ds.captions, owner) if i in kept]
        out["retrieval"] = retrieval(test_x, encode_texts(model, [t for t, _ in pairs], device),
                                     [i for _, i in pairs], cfg.recall_k)
    if "fewshot" in cfg.protocols:
        base = feats["train"].mean(0) if "train" in feats else test_x.mean(0)
        try:
            out["fewshot"] = fewshot(test_x, test_y, base, ways=cfg.fewshot_ways, shots=cfg.fewshot_shots,
                                     queries=cfg.fewshot_queries, episodes=cfg.fewshot_episodes, seed=cfg.seed)
        except ValueError as e:
            out["fewshot"] = {"skipped": str(e)}
    if "linear_probe" in cfg.protocols:
        if "train" not in feats:
            out["linear_probe"] = {"skipped": f"{ds.name} has no train split"}
        else:
            val = (feats["val"], splits["val"].labels) if "val" in feats else None
            out["linear_probe"] = linear_probe(
                feats["train"], splits["train"].labels, test_x, test_y, n_classes=len(ds.class_names),
                metric=ds.metric, val=val, val_fraction=cfg.probe_val_fraction, seed=cfg.seed,
                device=device, max_iter=cfg.probe_max_iter)
    return out


class CheckpointError(Exception):
    """--checkpoint cannot be used; main prints the message and exits 2."""


def run(cfg: EvalConfig) -> dict:
    """Evaluate cfg.checkpoint on this rank's share of cfg.datasets; write and return the report. Every set
    is opened before the checkpoint is loaded, so a missing set fails in seconds, not after the model."""
    from model.checkpoint import load_checkpoint
    from model.hub import resolve_location
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    # Under a multi-process launch (srun, torchrun) rank r evaluates sets r, r + W, ... (common/ranks.py).
    from common.ranks import resolve_ranks
    ranks = resolve_ranks()
    names = cfg.datasets[ranks.rank::ranks.world_size]
    sets = [open_eval_set(name, cfg.data_root) for name in names]        # fail early on missing sets
    try:
        location = resolve_location(cfg.checkpoint)  # local-dir:PATH; hf-hub:ORG/NAME, downloaded
    except OSError as err:  # model.hub: no network, no such repository
        raise CheckpointError(str(err)) from err
    if not location.exists():
        raise CheckpointError(f"checkpoint {cfg.checkpoint} does not exist")
    try:
        identity = checkpoint_identity(str(location))  # reads an export's header: it may be truncated
        model, info = load_checkpoint(location, cfg.model)
    except (ValueError, OSError) as err:  # unreadable, mismatched, no config: the user's input
        one_line = getattr(err, "one_line", None)  # a mismatch: the file and the first keys
        raise CheckpointError(one_line() if one_line else str(err)) from err
    model = model.to(device).eval()
    ckpt_key = (identity.get("sha256") or identity["listing_sha256"])[:16]
    results, timing = {}, {}
    for ds in sets:
        t0 = time.perf_counter()
        results[ds.name] = evaluate_set(model, ds, cfg, ckpt_key, device)
        timing[ds.name] = time.perf_counter() - t0
    report = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "checkpoint": {**identity, "format": info.get("format"), "model": info["config"].get("name"),
                             "weights_sha256": info.get("sha256")},
              "model_config": info["config"], "config": dataclasses.asdict(cfg), "device": device,
              "results": results, "seconds": timing}
    report["table"] = markdown_table(results)
    if cfg.format == "clip_benchmark":
        from evaluation.clip_benchmark import write_results
        report["files"] = write_results(results, Path(cfg.out), model=cfg.model or info["config"].get("name", ""),
                                         pretrained=cfg.checkpoint)
        return report
    out = Path(cfg.out)
    if ranks.world_size > 1:
        out = out.with_name(f"{out.stem}.rank{ranks.rank}-of-{ranks.world_size}{out.suffix}")
        report["files"] = [str(out)]
    write_json_atomic(out, report, indent=1)
    return report
