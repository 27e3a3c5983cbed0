"""Evaluation throughput: feature extraction images/s (tiny model, Fashion-MNIST) and the linear probe
(ours: evaluation/probe.py, scipy's L-BFGS-B on a numpy objective) against scikit-learn's LogisticRegression(lbfgs)
running the
same split, standardisation, C mapping and coarse-to-fine search on the same features. scikit-learn is
timed at 1 thread and at all threads and the faster counts as the baseline.

  python -m benchmarks eval --out eval.json [--n-train 6000] [--n-test 2000] [--features pixels|model]
"""
import dataclasses
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks.common import machine, parse_config, write_json
from common.config import option
from evaluation.datasets import open_eval_set
from evaluation.features import extract_features, subsample
from evaluation.probe import linear_probe


@dataclasses.dataclass
class EvalBenchOptions:
    out: str | None = option(None, help="where to write the JSON result")
    n_train: int = option(6000, help="Fashion-MNIST training images of the linear probe")
    n_test: int = option(2000, help="Fashion-MNIST test images")
    features: str = option("pixels", choices=("pixels", "model"),
                           help="probe on raw Fashion-MNIST pixels (784-d) or tiny-model features (64-d)")
    tol: float = option(1e-4, help="solver tolerance of both probes")


def main(argv: list[str]) -> dict:
    a = parse_config(EvalBenchOptions, "eval", argv, __doc__)
    from model.clip import build_model
    ds = open_eval_set("fashion_mnist", "/nonexistent")
    tr, _ = subsample(ds.splits["train"], a.n_train, 0)
    te, _ = subsample(ds.splits["test"], a.n_test, 0)
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    t0 = time.perf_counter()
    feats = {k: extract_features(model, s, size=model.image_size, device="cpu", batch_size=256, workers=0)
             for k, s in (("train", tr), ("test", te))}
    extract_s = time.perf_counter() - t0
    if a.features == "pixels":
        feats = {k: s.arrays.reshape(len(s), -1).astype(np.float32) / 255 for k, s in (("train", tr), ("test", te))}
    args = (feats["train"], tr.labels, feats["test"], te.labels)
    linear_probe(*[x[:200] for x in args], n_classes=10)              # warm-up (imports, first calls)
    linear_probe(*[x[:200] for x in args], n_classes=10, backend="sklearn")
    # scikit-learn's strongest setting on this machine: its lbfgs alternates numpy's BLAS pool with its
    # own OpenMP loss kernels, which on few cores can run faster on one thread than on all of them.
    refs = {}
    for threads in sorted({1, torch.get_num_threads()}):
        with threadpool_limits(limits=threads):
            refs[threads] = linear_probe(*args, n_classes=10, backend="sklearn", tol=a.tol)
    ref_threads, ref = min(refs.items(), key=lambda kv: kv[1]["seconds"])
    ours = linear_probe(*args, n_classes=10, tol=a.tol)
    result = {"benchmark": "eval", "machine": machine(), "torch_threads": torch.get_num_threads(),
              "feature_extraction_images_per_s": (len(tr) + len(te)) / extract_s,
              "probe_features": a.features, "n_train": len(tr), "n_test": len(te),
              "dim": int(args[0].shape[1]), "tol": a.tol,
              "probe_seconds": ours["seconds"], "sklearn_probe_seconds": ref["seconds"],
              "sklearn_probe_threads": ref_threads,
              "sklearn_probe_seconds_by_threads": {t: r["seconds"] for t, r in refs.items()},
              "probe_accuracy": ours["accuracy"], "sklearn_probe_accuracy": ref["accuracy"],
              "probe_lambda": ours["lambda"], "sklearn_probe_lambda": ref["lambda"],
              "probe_speedup": ref["seconds"] / ours["seconds"],
              "probe_accuracy_delta": ours["accuracy"] - ref["accuracy"]}
    print({k: v for k, v in result.items() if k != "machine"})
    return write_json(result, a.out)
