"""Few-shot classification: N-way K-shot episodes solved by the nearest class prototype.

The paper's protocol (5-way 5-shot, 15 queries per class, 1000 episodes, on the test split): features are
centred with the mean of the train split (the "base" classes; the test mean when a set has no train split)
and L2-normalised, a class's prototype is the mean of its support features, and a query takes the class
of the nearest prototype. Episodes come from a seeded generator, so runs and checkpoints see the same ones.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def fewshot_episodes(labels: np.ndarray, *, ways: int, shots: int, queries: int, episodes: int, seed: int):
    """Yield (support_idx, support_y, query_idx, query_y), y in 0..ways-1; same seed, same episodes.
    Support and query of an episode are disjoint draws without replacement from each class."""
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    eligible = sorted(c for c, idx in by_class.items() if len(idx) > shots)
    if len(eligible) < ways:
        raise ValueError(f"few-shot needs {ways} classes with more than {shots} images; found {len(eligible)}")
    q = min(queries, min(len(by_class[c]) for c in eligible) - shots)
    rng = np.random.default_rng(seed)
    for _ in range(episodes):
        classes = rng.choice(eligible, ways, replace=False)
        picks = [rng.choice(by_class[c], shots + q, replace=False) for c in classes]
        yield (np.concatenate([p[:shots] for p in picks]), np.repeat(np.arange(ways), shots),
               np.concatenate([p[shots:] for p in picks]), np.repeat(np.arange(ways), q))


def fewshot(features: np.ndarray, labels: np.ndarray, base_mean: np.ndarray, *, ways=5, shots=5,
            queries=15, episodes=1000, seed=0) -> dict:
    """Mean accuracy over the episodes (percent) with its 95% confidence interval."""
    x = F.normalize(torch.from_numpy(features - base_mean), dim=-1)
    accs = []
    for s_idx, s_y, q_idx, q_y in fewshot_episodes(labels, ways=ways, shots=shots, queries=queries,
                                                   episodes=episodes, seed=seed):
        protos = x[s_idx].view(ways, shots, -1).mean(dim=1)        # support is grouped by class
        pred = torch.cdist(x[q_idx], protos).argmin(dim=1).numpy()
        accs.append((pred == q_y).mean())
    accs = 100 * np.asarray(accs)
    return {"accuracy": float(accs.mean()), "ci95": float(1.96 * accs.std(ddof=1) / math.sqrt(len(accs))),
            "episodes": len(accs), "ways": ways, "shots": shots, "queries": int(len(q_y) // ways)}
