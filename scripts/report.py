"""The demo's report: <out>/report.md (methods x metrics table, curves, stage throughput, verdict),
<out>/curves.png and <out>/summary.json, all from the files the stages wrote. Nothing is hard-coded:
the verdict and the diagnosis are computed from this run's numbers.

    .venv/bin/python scripts/report.py results/demo     # rewrite the report of a finished demo
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

if __name__ == "__main__":  # run as a script: the repository's packages come from its root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.io import read_jsonl, write_atomic, write_with  # noqa: E402

SET_LABEL = {"openclipart": "OpenClipart", "emoji": "Emoji", "fashion_mnist": "F-MNIST"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _jsonl(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(path)] if path.is_file() else []


OTHER = "other words"  # in the headers of retrieval whose texts are worded otherwise than the captions


def columns(datasets: list[str], other: list[str] = ()) -> list[tuple[str, str, str, str]]:
    """(header, eval file kind, dataset name in eval.py's results, path of the number). `other`: the sets
    that also have retrieval with each image's other human text (scripts/demo.py, other_wording)."""
    cols = []
    for name in datasets:
        cols.append((f"ZS {SET_LABEL.get(name, name)} top-1", "heldout", f"captions:heldout-{name}", "zeroshot/top1"))
    for name in datasets:
        lab = SET_LABEL.get(name, name)
        cols.append((f"{lab} I→T R@5", "heldout", f"captions:heldout-{name}", "retrieval/image_to_text_R@5"))
        cols.append((f"{lab} T→I R@5", "heldout", f"captions:heldout-{name}", "retrieval/text_to_image_R@5"))
    for name in (n for n in datasets if n in other):
        lab = SET_LABEL.get(name, name)
        cols.append((f"{lab} {OTHER} I→T R@5", "heldout", f"captions:heldout-{name}-other",
                     "retrieval/image_to_text_R@5"))
        cols.append((f"{lab} {OTHER} T→I R@5", "heldout", f"captions:heldout-{name}-other",
                     "retrieval/text_to_image_R@5"))
    cols += [("F-MNIST ZS", "fmnist", "fashion_mnist", "zeroshot/top1"),
             ("F-MNIST 5w5s", "fmnist", "fashion_mnist", "fewshot/accuracy"),
             ("F-MNIST linear", "fmnist", "fashion_mnist", "linear_probe/accuracy")]
    return cols


def cfg_columns(cfg) -> list[tuple[str, str, str, str]]:
    return columns(cfg.datasets, cfg.other_wording)


def _get(results: dict, ds: str, path: str):
    x = results.get(ds, {})
    for part in path.split("/"):
        x = x.get(part) if isinstance(x, dict) else None
    return x


def collect(out: Path, cfg, methods: dict) -> dict:
    """method -> {"final": {header: [value per seed]}, "curves": [per seed: (steps, zs mean)], "loss": ...}"""
    cols = cfg_columns(cfg)
    data = {}
    for method in cfg.methods:
        m = {"final": {c[0]: [] for c in cols}, "curves": [], "loss": [], "train_sps": []}
        for seed in range(cfg.seeds):
            ev = out / "eval" / f"{method}-seed{seed}"
            steps_files = sorted(ev.glob("heldout-step-*.json"))
            if not steps_files:
                continue
            final = {"heldout": _load(steps_files[-1])["results"],
                     "fmnist": _load(ev / "fashion_mnist.json")["results"] if (ev / "fashion_mnist.json").is_file() else {}}
            for head, kind, ds, path in cols:
                m["final"][head].append(_get(final[kind], ds, path))
            curve = []
            for f in steps_files:
                res = _load(f)["results"]
                zs = [_get(res, f"captions:heldout-{d}", "zeroshot/top1") for d in cfg.datasets]
                curve.append((int(f.stem.split("-")[-1]), float(np.mean(zs))))
            m["curves"].append(curve)
            rows = _jsonl(out / "runs" / f"{method}-seed{seed}" / "metrics.jsonl")
            m["loss"].append([(r["step"], r["loss"]) for r in rows])
            m["train_sps"] += [r["samples_per_s"] for r in rows[5:]]
        data[method] = m
    return data


def mean_std(values: list) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def fmt(mean, std) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def chance_levels(cfg, sets: dict) -> dict[str, float]:
    """What a model that knows nothing scores in each column, in percent: zero-shot 1 / classes,
    recall@5 5 / candidates, Fashion-MNIST's 10 classes, 5-way few-shot 1 / 5."""
    chance = {"F-MNIST ZS": 10.0, "F-MNIST 5w5s": 20.0, "F-MNIST linear": 10.0}
    for head, _, name, path in cfg_columns(cfg):
        set_name = name.removeprefix("captions:heldout-")
        info = sets.get(set_name.removesuffix("-other"), {})
        images = info.get("other_wording") if set_name.endswith("-other") else info.get("heldout")
        if path == "zeroshot/top1" and info.get("categories"):
            chance[head] = 100.0 / info["categories"]
        elif "R@5" in path and images:
            chance[head] = 100.0 * min(5, images) / images
    return chance


def table(data: dict, cfg, methods: dict, chance: dict | None = None) -> str:
    cols = cfg_columns(cfg)
    stats = {m: {h: mean_std(d["final"][h]) for h, *_ in cols} for m, d in data.items()}
    best = {h: max((s[h][0] for s in stats.values() if s[h][0] is not None), default=None) for h, *_ in cols}
    lines = ["| Method | " + " | ".join(h for h, *_ in cols) + " |", "|---|" + "---|" * len(cols)]
    for m, s in stats.items():
        cells = []
        for h, *_ in cols:
            text = fmt(*s[h])
            cells.append(f"**{text}**" if s[h][0] is not None and s[h][0] == best[h] else text)
        lines.append(f"| {methods[m][0]} | " + " | ".join(cells) + " |")
    if chance:
        lines.append("| *chance* | " + " | ".join(f"*{chance[h]:.1f}*" if h in chance else "-" for h, *_ in cols) + " |")
    return "\n".join(lines)


def plot(data: dict, cfg, methods: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m, d in data.items():
        label = methods[m][0]
        if d["loss"]:
            n = min(len(x) for x in d["loss"])
            steps = [s for s, _ in d["loss"][0][:n]]
            loss = np.mean([[v for _, v in x[:n]] for x in d["loss"]], axis=0)
            k = max(1, n // 30)  # moving average: the per-step loss is noisy at batch 128
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax1.plot(steps[k - 1:], smooth, label=label)
        if d["curves"]:
            n = min(len(c) for c in d["curves"])
            steps = [s for s, _ in d["curves"][0][:n]]
            ys = np.array([[v for _, v in c[:n]] for c in d["curves"]])
            ax2.plot(steps, ys.mean(0), marker="o", label=label)
            if len(ys) > 1:
                ax2.fill_between(steps, ys.mean(0) - ys.std(0, ddof=1), ys.mean(0) + ys.std(0, ddof=1), alpha=0.2)
    ax1.set(xlabel="step", ylabel="training loss (moving average)", title="Training loss")
    ax2.set(xlabel="step", ylabel="top-1 %", title="Zero-shot on the held-out split (mean of sets)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _headline(data: dict, method: str, cfg) -> list:
    """Per seed: mean zero-shot top-1 over the held-out sets (the paper's headline protocol)."""
    heads = [h for h, *_ in cfg_columns(cfg) if h.startswith("ZS ")]
    per = [data[method]["final"][h] for h in heads]
    return [float(np.mean(v)) if None not in v else None for v in zip(*per)]


def _retrieval(data: dict, method: str, cfg, other: bool = False) -> list:
    """Per seed: mean R@5 over both directions and the sets, with the captions as texts (or, `other`, the
    images' other human texts)."""
    heads = [h for h, *_ in cfg_columns(cfg) if "R@5" in h and (OTHER in h) == other]
    per = [data[method]["final"][h] for h in heads]
    return [float(np.mean(v)) if None not in v else None for v in zip(*per)] if per else []


def _retrieval_other(data: dict, method: str, cfg) -> list:
    return _retrieval(data, method, cfg, other=True)


def _paired(data: dict, cfg, method: str, fn) -> tuple[float, float, int] | None:
    """method - CLIP per seed: (mean, standard error, seeds)."""
    if method not in data or "clip" not in data:
        return None
    diffs = [y - x for x, y in zip(fn(data, "clip", cfg), fn(data, method, cfg)) if x is not None and y is not None]
    if not diffs:
        return None
    se = float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs)) if len(diffs) >= 2 else float("nan")
    return float(np.mean(diffs)), se, len(diffs)


def paired_test(d: float, se: float, seeds: int) -> tuple[float, float]:
    """Two-sided paired t-test of a mean per-seed difference d with standard error se over `seeds` seeds
    (n - 1 degrees of freedom): (p value, smallest detectable difference), the latter being the
    difference that would just reach p = 0.05 with this spread (t(0.975, n - 1) x se)."""
    from scipy import stats
    df = seeds - 1
    smallest = float(stats.t.ppf(0.975, df) * se)
    if se == 0:
        return (0.0 if d != 0 else 1.0), smallest
    return float(2 * stats.t.sf(abs(d / se), df)), smallest


METRICS = (("zero-shot top-1 (mean of the held-out sets)", _headline),
           ("retrieval R@5 (mean of both directions and sets)", _retrieval),
           (f"retrieval R@5 with the images' other human texts ({OTHER}: not the training captions)",
            _retrieval_other))


def differences(data: dict, cfg, labels: dict) -> str:
    """Every method minus CLIP, paired by seed, on each headline metric: mean ± std of the difference,
    the paired t-test's p and the smallest difference these seeds could detect."""
    if "clip" not in data:
        return ""
    lines = ["| method − CLIP | zero-shot top-1 | retrieval R@5 | retrieval R@5, " + OTHER + " |", "|---|---|---|---|"]
    for m in (m for m in data if m != "clip"):
        cells = []
        for _, fn in METRICS:
            paired = _paired(data, cfg, m, fn)
            if paired is None:
                cells.append("-")
            elif paired[2] < 2:
                cells.append(f"{paired[0]:+.1f} (1 seed)")
            else:
                d, se, n = paired
                p, smallest = paired_test(d, se, n)
                mark = "**" if p < 0.05 else ""
                cells.append(f"{mark}{d:+.1f}{mark} ± {se * math.sqrt(n):.1f} (p = {p:.3f}; detectable ±{smallest:.1f})")
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(data: dict, cfg, info: dict) -> list[str]:
    """Does LaCLIP beat CLIP here? Paired by seed, a two-sided paired t-test at 5% with n - 1 degrees of
    freedom, and the smallest difference these seeds could have detected."""
    if "clip" not in data or "laclip" not in data:
        return ["(CLIP or LaCLIP was not run: no comparison.)"]
    out = []
    for name, fn in METRICS:
        a, b = fn(data, "clip", cfg), fn(data, "laclip", cfg)
        paired = _paired(data, cfg, "laclip", fn)
        if paired is None:
            continue
        d, se, seeds = paired
        if seeds >= 2:
            p, smallest = paired_test(d, se, seeds)
            spread = (f"{d:+.1f} ± {se * math.sqrt(seeds):.1f} (std of the paired difference over {seeds} seeds; "
                      f"paired t-test, {seeds - 1} df, p = {p:.3f}; smallest detectable difference ±{smallest:.1f})")
            if p < 0.05:
                call = "LaCLIP **beats** CLIP" if d > 0 else "LaCLIP is **worse** than CLIP"
            else:
                call = (f"**no difference detectable** with {seeds} seeds (a true difference under "
                        f"±{smallest:.1f} points could hide in this spread)")
        else:
            spread = f"{d:+.1f} on a single seed"
            call = "**not established** (one seed measures no spread; run `--seeds 3`)"
        out.append(f"- {name}: CLIP {np.mean([x for x in a if x is not None]):.1f}, LaCLIP "
                   f"{np.mean([y for y in b if y is not None]):.1f}; LaCLIP - CLIP = {spread}: {call}.")
    out += noise_floor(data, cfg, info)
    return out


def noise_floor(data: dict, cfg, info: dict) -> list[str]:
    """Scales of noise measurable from one seed: test-set sampling error and the checkpoint-to-checkpoint
    wobble of CLIP's own held-out zero-shot curve (the same run, 1 checkpoint apart)."""
    lines = []
    n = sum(v["heldout"] for v in info["data"]["sets"].values())
    clip = data.get("clip", {})
    zs = _headline(data, "clip", cfg) if clip.get("final") else []
    if zs and zs[0] is not None and n:
        p = zs[0] / 100
        lines.append(f"- Noise scales measured here: the held-out split has {n} images, so a zero-shot accuracy "
                     f"near {100 * p:.0f}% carries a sampling error of about ±{100 * math.sqrt(p * (1 - p) / n):.1f} "
                     "points")
    curves = clip.get("curves") or []
    if curves and len(curves[0]) >= 3:
        steps_diff = [abs(b[1] - a[1]) for a, b in zip(curves[0][len(curves[0]) // 2:], curves[0][len(curves[0]) // 2 + 1:])]
        if steps_diff and lines:
            lines[-1] += (f"; CLIP's own zero-shot moves by {np.mean(steps_diff):.1f} points on average between "
                          f"consecutive checkpoints ({cfg.checkpoint_every} steps apart) in the second half of "
                          "training. Differences between methods smaller than these are not evidence either way.")
    elif lines:
        lines[-1] += "."
    return lines


def augmentation_control(data: dict, cfg, info: dict) -> list[str]:
    """Is it varying the text that hurts, or what the LLM rewrites say? EDA varies the text with
    meaning-preserving word edits; LaCLIP with the LLM's rewrites; LaCLIP-MT always keeps the original."""
    rows = {m: _paired(data, cfg, m, _retrieval) for m in ("laclip", "laclip_mt", "eda")}
    if any(v is None for v in rows.values()) or rows["laclip"][2] < 3:
        return []
    said = ", ".join(f"{info['labels'][m]} {d:+.1f} (p = {paired_test(d, se, n)[0]:.3f})"
                     for m, (d, se, n) in rows.items())
    line = (f"- **Text-augmentation control** (retrieval R@5 minus CLIP's, paired by seed, paired t-test): "
            f"{said}.")
    worse = lambda m: rows[m][0] < 0 and paired_test(*rows[m])[0] < 0.05   # noqa: E731
    if worse("laclip") and not worse("eda"):
        line += (" EDA varies every caption too and stays level with CLIP, so varying the text is not what hurts "
                 "here; what the LLM rewrites say is (rewrite quality: read the live before/after pairs below for "
                 "how far they drift from the original). LaCLIP-MT, which always trains on the original "
                 "caption beside the rewrites, loses " + ("less." if rows["laclip_mt"][0] > rows["laclip"][0]
                                                          else "as much."))
    elif worse("laclip") and worse("eda"):
        line += " Both kinds of text augmentation cost accuracy here: this data and budget do not reward varying the text."
    return [line]


def diagnosis(data: dict, cfg, info: dict) -> list[str]:
    """The usual reasons LaCLIP would not help, measured on this run."""
    lines = augmentation_control(data, cfg, info)
    llm = info["packs"].get("llm", {})
    tc = llm.get("text_counts", {})
    n = tc.get("samples") or 1
    cover = tc.get("with_rewrites", 0) / n
    lines.append(f"- **Rewrite coverage**: {tc.get('with_rewrites', 0)} of {n} training images ({100 * cover:.0f}%) "
                 f"have at least one LLM rewrite (max {tc.get('max_texts', 1)} texts per image)."
                 + (" LaCLIP draws the original caption for every other image, so on this data it is mostly CLIP."
                    if cover < 0.5 else ""))
    rw = info["rewrite"]
    filtered = info["packs"].get("llm_filtered", {}).get("text_counts")
    if filtered:
        dropped = filtered.get("low_fidelity_dropped") or {}
        kept = filtered.get("with_rewrites", 0)
        lines.append(f"- **Fidelity filter** (LaCLIP, faithful rewrites: fidelity >= {cfg.min_fidelity}, fixed in "
                     f"advance): {sum(dropped.values())} LLM rewrites dropped ({', '.join(f'{k} {v}' for k, v in dropped.items())}); "
                     f"{kept} of {filtered.get('samples')} training images keep at least one rewrite (mean "
                     f"fidelity of the LLM rewrites {rw.get('llm_fidelity', {}).get('mean')}).")
    human = info["packs"].get("human", {}).get("text_counts")
    if human:
        lines.append(f"- **Human alt texts** (the oracle): {human.get('with_rewrites', 0)} of {human.get('samples')} "
                     f"training images have another human text (clip art: title, description, keywords; emoji: "
                     f"aliases); {human.get('texts', 0) - human.get('samples', 0)} texts besides the captions.")
    for s in rw.get("shipped", []):
        lines.append(f"- Shipped store {s['path']}: {s['engine']} / {s['model']} seed {s['seed']}, pools "
                     f"{', '.join(s['pools'])}, {s['shard_files']} shard files, {s['matched_train']} training captions.")
        if s.get("filter_counts"):
            fc = s["filter_counts"]
            # "fallback" in stores written before unfilled slots were left empty (they repeat the original)
            unfilled = fc.get("unfilled", fc.get("fallback", 0))
            slots = fc.get("kept", 0) + unfilled
            lines.append(f"  Filter counts {fc}: {unfilled} of {slots} rewrite slots "
                         f"({100 * unfilled / max(1, slots):.1f}%) got no acceptable rewrite; packing drops any "
                         f"text equal to its original caption, so those images have fewer texts.")
    if rw.get("live"):
        live = rw["live"]
        lines.append(f"- **Rewrite quality** (live sample, {live['captions']} captions): kept fraction "
                     f"{live.get('kept_fraction')}, filter counts {live.get('counts')}; see the examples below.")
    steps = cfg.steps
    gb = info.get("global_batch")
    if gb:
        epochs = steps * gb / max(1, n)
        texts = tc.get("texts", n) / max(1, n)
        lines.append(f"- **Training length**: {steps} steps x {gb} samples = {epochs:.1f} epochs over {n} images; "
                     f"with {texts:.1f} texts per image LaCLIP shows each text about {epochs / texts:.0f} times. "
                     + ("Each caption is seen only a few times: text overfitting, which rewrites counter, has "
                        "little room to appear." if epochs < 5 else
                        "Captions repeat many times: the regime where text augmentation should matter."))
    clip = data.get("clip", {}).get("curves") or []
    if clip:
        c = np.mean([[v for _, v in cv] for cv in clip], axis=0)
        steps_ = [s for s, _ in clip[0]]
        peak = int(np.argmax(c))
        trend = ("highest at the last checkpoint: still improving, so training is short of the regime where "
                 "text over-fitting limits CLIP" if peak == len(c) - 1 else
                 f"highest at step {steps_[peak]} ({c[peak]:.1f}) and ended at {c[-1]:.1f}: more steps on the "
                 "same captions stopped helping it")
        lines.append(f"- **Over-fitting check**: CLIP's held-out zero-shot (mean of the sets) was {trend}.")
    losses = {m: float(np.mean([np.mean([v for _, v in x[-10:]]) for x in d["loss"]]))
              for m, d in data.items() if d["loss"]}
    if losses:
        lines.append("- Final training loss (last 10 steps): " + ", ".join(
            f"{info['labels'][m]} {v:.3f}" for m, v in losses.items())
            + " (a higher loss with rewrites means the texts vary; a lower held-out score would not follow from it).")
    return lines


def fidelity_section(out: Path, cfg) -> list[str]:
    """Fidelity (rewrite/fidelity.py scores) of the texts the methods train on: the LLM rewrites per style
    and the EDA rewrites, as <out>/fidelity.png and a table with examples at the low end, median and
    high end. Nothing when no text is scored."""
    from rewrite.fidelity import MODEL_NAME, plot, summarize, summarize_sources
    captions = {r["key"]: r["caption"] for r in _jsonl(out / "rewrites" / "train" / "captions.jsonl")}
    sources: dict[str, list] = {}
    for row in _jsonl(out / "rewrites" / "llm.jsonl"):
        if row["key"] in captions and row.get("scores"):
            for text, score, style in zip(row["rewrites"], row["scores"], row["styles"]):
                sources.setdefault(f"LLM {style}", []).append((score, captions[row["key"]], text))
    pools = summarize_sources(sources, threshold=cfg.min_fidelity)
    eda = out / "rewrites" / "eda"
    if (eda / "run.json").is_file():
        pools.update({f"EDA {k}": v for k, v in summarize(eda, threshold=cfg.min_fidelity)["pools"].items()})
    if not pools:
        return []
    summary = {"store": f"texts of the training images ({MODEL_NAME})", "engine": "LLM and EDA", "pools": pools}
    write_with(out / "fidelity.png", lambda tmp: plot(summary, tmp, threshold=cfg.min_fidelity))
    lines = ["## Fidelity of the rewrites", "",
             f"Cosine similarity of each rewrite to its caption ({MODEL_NAME}); the dashed line is the threshold "
             f"of 'LaCLIP, faithful rewrites' ({cfg.min_fidelity}).", "", "![fidelity histograms](fidelity.png)", "",
             "| source | texts | mean | 5% | median | 95% | below threshold |", "|---|---|---|---|---|---|---|"]
    for name, v in pools.items():
        q = v["quantiles"]
        lines.append(f"| {name} | {v['n']} | {v['mean']:.2f} | {q['0.05']:.2f} | {q['0.5']:.2f} | {q['0.95']:.2f} | "
                     f"{100 * v['below_threshold'] / v['n']:.0f}% |")
    lines += ["", "Examples (score: caption -> rewrite):", ""]
    for name, v in pools.items():
        for where in ("low", "median", "high"):
            ex = v["examples"][where][0]
            lines.append(f"- {name}, {where}: {ex['score']:.2f}: {ex['caption']!r} -> {ex['rewrite']!r}")
    return lines + [""]


def throughput(info: dict, data: dict, methods: dict) -> str:
    rows = ["| Stage | Rate | Notes |", "|---|---|---|"]
    rw = info["rewrite"]
    if rw.get("live"):
        live = rw["live"]
        pools = live.get("pools") or "the config's pools"
        rows.append(f"| rewrite, live ({live.get('engine', 'hf')} + SmolLM2, CPU) | {live.get('captions_per_s')} captions/s | "
                    f"{live['captions']} captions x pools {pools} ({live.get('seconds')} s) |")
    if rw.get("eda"):
        rows.append(f"| rewrite, EDA baseline | {rw['eda'].get('captions_per_s')} captions/s | "
                    f"{rw['eda'].get('captions')} captions ({rw['eda'].get('seconds')} s) |")
    for name, p in info["packs"].items():
        rows.append(f"| pack '{name}' (loaders.pack, FFCV + DALI files) | {p.get('samples_per_s')} samples/s | "
                    f"{p['samples']} samples ({p.get('seconds')} s) |")
    lb = info.get("loader") or {}
    rows.append(f"| loader ({lb.get('kind')}, 1 rank, {lb.get('image_size')} px, batch {lb.get('batch_size')}) | "
                f"{lb.get('samples_per_s')} samples/s | first batch {lb.get('first_batch_s')} s |")
    for m, d in data.items():
        if d["train_sps"]:
            rows.append(f"| train {methods[m][0]} (2 ranks, CPU) | {float(np.median(d['train_sps'])):.0f} samples/s | "
                        "median over steps, from metrics.jsonl |")
    return "\n".join(rows)


def write_report(out: Path, cfg, methods: dict, info: dict) -> str:
    from rewrite.store import filter_counts
    for s in info["rewrite"].get("shipped", []):
        try:
            s["filter_counts"] = filter_counts(s["path"])
        except (OSError, ValueError, KeyError):
            pass
    info["labels"] = {m: methods[m][0] for m in cfg.methods}
    runs = list(info.get("runs", {}).values())
    import yaml
    tc = yaml.safe_load(Path(cfg.train_config).read_text())
    micro = cfg.train_overrides.get("micro_batch", tc.get("micro_batch"))
    info["global_batch"] = micro * cfg.ranks * cfg.train_overrides.get("accumulation", tc.get("accumulation", 1))
    data = collect(out, cfg, methods)
    tab = table(data, cfg, methods, chance_levels(cfg, info["data"]["sets"]))
    plot(data, cfg, methods, out / "curves.png")
    d = info["data"]
    sets = ", ".join(f"{k}: {v['train']} train / {v['heldout']} held-out, {v['categories']} categories"
                     for k, v in d["sets"].items())
    md = ["# LaCLIP demo report",
          "",
          f"Data: {sets}. Model `{tc.get('model')}`, {cfg.steps} steps at global batch {info['global_batch']} "
          f"({cfg.ranks} ranks on CPU, DeepSpeed ZeRO-{tc.get('zero_stage')}), same initial weights and data order "
          f"for every method; {cfg.seeds} seed(s) per method" + (" (mean ± std over seeds)" if cfg.seeds > 1 else "")
          + ". Numbers in percent; best of each column in bold; the last row is chance.",
          "",
          tab,
          "",
          "Columns: ZS = zero-shot top-1 with the category names as classes on the held-out split; I→T / T→I = "
          "retrieval recall@5 on the held-out split with the captions as the texts, and (" + OTHER + ") with each "
          "image's other human text (clip art: its keywords; emoji: an alias), worded unlike the captions every "
          "method trains on (except 'LaCLIP, human alt texts', which trains on that kind of text for the training "
          "images, so for it these columns are in-distribution); F-MNIST = Fashion-MNIST "
          f"({cfg.fmnist_max_per_split} train / test images): zero-shot, 5-way 5-shot prototypes, linear probe.",
          "",
          "## Does LaCLIP beat CLIP here?",
          "",
          *verdict(data, cfg, info),
          "",
          "Every method against CLIP (difference in points, paired by seed; bold: p < 0.05 in a two-sided paired "
          "t-test with n - 1 degrees of freedom; detectable: the smallest difference these seeds could detect):",
          "",
          differences(data, cfg, info["labels"]),
          "",
          "What this run says about why (measured, not assumed):",
          "",
          *diagnosis(data, cfg, info),
          "",
          *fidelity_section(out, cfg),
          "## Curves",
          "",
          "![training loss and zero-shot accuracy](curves.png)",
          "",
          "## Throughput of each stage (this machine, this run)",
          "",
          throughput(info, data, methods),
          ""]
    live = info["rewrite"].get("live")
    if live:
        md += ["## Live rewrites (before -> after)", ""]
        for ex in live["examples"]:
            md.append(f"- {ex['caption']!r}")
            md += [f"  - {t!r}" for t in ex["rewrites"]]
        md.append("")
    if not info["rewrite"].get("shipped"):
        md += ["**No shipped rewrite store was found** (`make rewrites` creates it under "
               f"`{cfg.shipped_rewrites}`): LaCLIP and LaCLIP-MT had rewrites only for the live sample.", ""]
    md += ["## Stage times (this invocation; 0 = reused)", "",
           ", ".join(f"{k} {v:.0f} s" for k, v in info.get("stage_seconds", {}).items()), "",
           "Commands: " + "; ".join(f"`{r['command']}`" for r in runs[:1]) + " (one per method and seed).", ""]
    text = "\n".join(md)
    write_atomic(out / "report.md", text)
    summary = {"table": {m: d["final"] for m, d in data.items()}, "info": info}
    write_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str))
    return tab


if __name__ == "__main__":
    from scripts.demo_config import METHODS, DemoConfig

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/demo")
    cfg = DemoConfig(**_load(root / "config.json"))
    stages = {p.stem: _load(p)["result"] for p in (root / "stages").glob("*.json")}
    info = {"data": stages["data"], "rewrite": stages["rewrite"], "loader": stages.get("loader"),
            "packs": {k[5:]: v for k, v in stages.items() if k.startswith("pack-")},
            "runs": {k[6:]: v for k, v in stages.items() if k.startswith("train-")}}
    print(write_report(root, cfg, METHODS, info))
