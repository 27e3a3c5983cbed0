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
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluation.probe import linear_probe
from loaders.augment import CLIP_MEAN, CLIP_STD
from loaders.eval_sets import PAPER_SETS, EvalSet, Split, open_eval_set

FORMAT, FORMAT_VERSION = "laclip-eval", 1
PROTOCOLS = ("zeroshot", "fewshot", "linear_probe", "retrieval")
OUTPUT_FORMATS = ("laclip", "clip_benchmark")


@dataclass
class EvalConfig:
    checkpoint: str = ""
    model: str | None = None            # model/configs name, needed for open_clip state dicts
    datasets: list[str] = field(default_factory=lambda: ["digits"])
    data_root: str = "data"
    out: str = "results.json"           # with format clip_benchmark: a folder of one JSON per set and task
    format: str = "laclip"              # or clip_benchmark (evaluation/clip_benchmark.py)
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    cache_dir: str = ".cache/eval_features"
    batch_size: int = 256
    workers: int = 2
    device: str = "auto"
    max_per_split: int = 0              # >0: fixed subsample of each split (quick CPU runs)
    fewshot_ways: int = 5
    fewshot_shots: int = 5
    fewshot_queries: int = 15
    fewshot_episodes: int = 1000
    seed: int = 0
    probe_val_fraction: float = 0.2
    probe_max_iter: int = 1000


# ---- checkpoint identity and features ------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_identity(path: str) -> dict:
    """sha256 of the weights file; for a directory, of its listing (path, size, mtime of every file)."""
    p = Path(path)
    if p.is_file():
        return {"path": str(p.resolve()), "sha256": sha256_file(p)}
    weights = p / "model.safetensors"
    if weights.is_file():
        return {"path": str(p.resolve()), "sha256": sha256_file(weights)}
    lines = sorted(f"{f.relative_to(p)}\t{f.stat().st_size}\t{f.stat().st_mtime_ns}"
                   for f in p.rglob("*") if f.is_file())
    return {"path": str(p.resolve()), "listing_sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def preprocess(image, size: int) -> torch.Tensor:
    """CLIP's eval transform, pixel for pixel as torchvision's Resize(size, BICUBIC) + CenterCrop(size)
    (open_clip's and CLIP_benchmark's): the short side becomes `size`, the long side int(size * long /
    short); the crop starts at int(round(excess / 2)). Then scale to [0, 1] and normalise."""
    from PIL import Image
    w, h = image.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


class _Images(torch.utils.data.Dataset):
    def __init__(self, split: Split, size: int):
        self.split, self.size = split, size

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return preprocess(self.split.image(i), self.size)


def _atomic_save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.inference_mode()
def extract_features(model, split: Split, *, size: int, device: str, batch_size: int, workers: int,
                     cache: Path | None = None, desc: str = "features") -> np.ndarray:
    """Unnormalised image features [N, D] float32, read from / written to `cache` (.npz)."""
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            if np.array_equal(z["labels"], split.labels):
                return z["features"]
    loader = torch.utils.data.DataLoader(_Images(split, size), batch_size=batch_size, num_workers=workers,
                                         persistent_workers=False)
    out = []
    for x in tqdm(loader, desc=desc, unit="batch", leave=False):
        out.append(model.encode_image(x.to(device)).float().cpu())
    feats = torch.cat(out).numpy() if out else np.zeros((0, model.embed_dim), np.float32)
    if cache is not None:
        _atomic_save_npz(cache, features=feats, labels=split.labels)
    return feats


@torch.inference_mode()
def encode_texts(model, texts: list[str], device: str, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings [N, D] on the CPU."""
    from model.tokenizer import get_tokenizer
    tok = get_tokenizer()
    out = [F.normalize(model.encode_text(tok(texts[i:i + batch_size]).to(device)).float(), dim=-1).cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out)


# ---- zero-shot and retrieval ---------------------------------------------------------------------

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


def retrieval(image_features: np.ndarray, text_features: torch.Tensor, caption_image=None) -> dict:
    """recall@1/5/10 both ways, in percent. Text t belongs to image caption_image[t] (default: t).
    image_to_text: an image is a hit if any of its texts is among its top K; text_to_image: a text is a
    hit if its image is among its top K. Ties rank as torch.topk ranks them (as in CLIP_benchmark)."""
    images = F.normalize(torch.from_numpy(image_features), dim=-1)
    owner = torch.arange(len(images)) if caption_image is None else torch.as_tensor(caption_image)
    scores = text_features @ images.T                                    # [texts, images]
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owner)), owner] = True
    out = {}
    for name, s, pos in (("image_to_text", scores.T, positive.T), ("text_to_image", scores, positive)):
        for k in (1, 5, 10):
            top = s.topk(min(k, s.shape[1]), dim=1).indices
            hits = pos.gather(1, top).any(dim=1)
            out[f"{name}_R@{k}"] = 100 * int(hits.sum()) / len(hits)
    return out


# ---- few-shot ------------------------------------------------------------------------------------

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


# ---- running a checkpoint over the sets ----------------------------------------------------------

def _subsample(split: Split, n: int, seed: int) -> tuple[Split, np.ndarray]:
    """A fixed subsample of n images (all when n <= 0) and the indices taken."""
    if n <= 0 or len(split) <= n:
        return split, np.arange(len(split))
    idx = np.sort(np.random.default_rng(seed).permutation(len(split))[:n])
    return Split(split.labels[idx], files=None if split.files is None else [split.files[i] for i in idx],
                 arrays=None if split.arrays is None else split.arrays[idx]), idx


def evaluate_set(model, ds: EvalSet, cfg: EvalConfig, ckpt_key: str, device: str) -> dict:
    size = int(model.image_size)
    taken = {k: _subsample(v, cfg.max_per_split, cfg.seed) for k, v in ds.splits.items()}
    splits = {k: v[0] for k, v in taken.items()}
    feats = {}
    for name, split in splits.items():
        key = hashlib.sha256(f"{ds.name}|{ds.source}|{name}|{len(split)}|{cfg.max_per_split}|{cfg.seed}|{size}"
                             .encode()).hexdigest()[:16]
        cache = (Path(cfg.cache_dir) / ckpt_key / f"{ds.name.replace(':', '-').replace('/', '_')}-{name}-{key}.npz"
                 if cfg.cache_dir else None)                       # "" = no feature cache
        feats[name] = extract_features(model, split, size=size, device=device, batch_size=cfg.batch_size,
                                       workers=cfg.workers, cache=cache, desc=f"{ds.name}/{name}")
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
                                     [i for _, i in pairs])
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
            lines.append("| " + " | ".join([f"{label} delta"] + ["-" if d is None else f"{d:+.1f}" for d in delta]) + " |")
    retr = [(n, d, r["retrieval"]) for n, res in runs for d, r in res.items() if "retrieval" in r]
    if retr:
        keys = list(retr[0][2])
        lines += ["", "| Retrieval | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
        lines += ["| " + f"{d} {n}".strip() + " | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |"
                  for n, d, r in retr]
    return "\n".join(lines)


def compare(a_path: str, b_path: str) -> str:
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    return markdown_table({}, [("A", a["results"]), ("B", b["results"])]) + f"\n\nA = {a_path}\nB = {b_path}"


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


class CheckpointError(Exception):
    """--checkpoint cannot be used; main prints the message and exits 2."""


def run(cfg: EvalConfig) -> dict:
    from model.checkpoint import load_checkpoint
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    # Under a multi-process launch (srun, torchrun) rank r evaluates sets r, r + W, ... (common/ranks.py).
    from common.ranks import resolve_ranks
    ranks = resolve_ranks()
    names = cfg.datasets[ranks.rank::ranks.world_size]
    sets = [open_eval_set(name, cfg.data_root) for name in names]        # fail early on missing sets
    if not Path(cfg.checkpoint).exists():
        raise CheckpointError(f"checkpoint {cfg.checkpoint} does not exist")
    identity = checkpoint_identity(cfg.checkpoint)
    try:
        model, info = load_checkpoint(cfg.checkpoint, cfg.model)
    except (ValueError, OSError) as err:  # unreadable, mismatched, no config: the user's input
        raise CheckpointError(str(err)) from err
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return report


def main(argv=None) -> int:
    cfg, cmp = _parse(sys.argv[1:] if argv is None else argv)
    if cmp:
        print(compare(*cmp))
        return 0
    if not cfg.checkpoint:
        raise SystemExit("eval.py: --checkpoint is required (or --compare A.json B.json)")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    try:
        report = run(cfg)
    except CheckpointError as err:
        print(f"eval.py: error: {err}", file=sys.stderr)
        return 2
    print(report["table"])
    print(f"eval: {len(report['results'])} datasets, {sum(report['seconds'].values()):.1f}s -> "
          f"{', '.join(report.get('files', [cfg.out]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
