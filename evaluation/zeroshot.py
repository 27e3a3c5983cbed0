"""Zero-shot classification: each class becomes a text classifier built from prompt templates.

As CLIP does it: a class's prompts ("a photo of a {}.", ...) are embedded and normalised, their mean is the
class's weight vector (renormalised); an image's logits are cosine similarities to those vectors. Reported
in percent: top-1, top-5 (sets with >= 5 classes) and mean per-class recall, the metric some sets use.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.features import encode_texts


def zeroshot_classifier(model, class_names: list[str], templates: list[str], device: str) -> torch.Tensor:
    """[D, C]: per class, the mean of the normalised embeddings of its prompts, renormalised."""
    texts = [t.format(c) for c in class_names for t in templates]
    emb = encode_texts(model, texts, device).view(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1).T


def classification_metrics(logits: torch.Tensor, labels: np.ndarray) -> dict:
    """top-1, top-5 (>= 5 classes) and mean per-class recall, in percent. Ties rank as torch.topk
    ranks them, as in CLIP_benchmark."""
    y = torch.as_tensor(labels)
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    out = {"top1": 100 * int((ranked[:, 0] == y).sum()) / len(y)}
    if logits.shape[1] >= 5:
        out["top5"] = 100 * int((ranked == y[:, None]).any(dim=1).sum()) / len(y)
    pred = logits.argmax(dim=1)
    recalls = [int((pred[y == c] == c).sum()) / int((y == c).sum()) for c in torch.unique(y)]
    out["mean_per_class"] = 100 * float(np.mean(recalls))
    return out


def zeroshot(features: np.ndarray, labels: np.ndarray, classifier: torch.Tensor) -> dict:
    logits = F.normalize(torch.from_numpy(features), dim=-1) @ classifier
    return classification_metrics(logits, labels)
