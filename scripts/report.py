"""The demo's report: <out>/report.md (methods x metrics table, curves, stage throughput, verdict),
<out>/curves.png and <out>/summary.json, all from the files the stages wrote. Nothing is hard-coded:
the verdict and the diagnosis are computed from this run's numbers (the numbers: scripts/demo_results.py;
the comparisons with CLIP: scripts/demo_stats.py).

    .venv/bin/python scripts/report.py results/demo     # rewrite the report of a finished demo
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

if __name__ == "__main__":  # run as a script: the repository's packages come from its root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.io import write_atomic, write_with
from scripts.demo_results import (OTHER, cfg_columns, chance_levels, collect, jsonl_rows, load_json,
                                  mean_std)
from scripts.demo_stats import (METRIC_LABELS, metric_chance, metric_value, noise_floor, per_seed,
                                secondary_table, verdict)


def fmt(mean, std) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


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
        lines.append("| *chance* | " + " | ".join(f"*{chance[h]:.1f}*" if h in chance else "-" for h, *_ in cols)
                     + " |")
    return "\n".join(lines)


def headline_table(data: dict, cfg, methods: dict, chance: dict, runs: dict) -> str:
    """Per method: each headline metric (mean ± sd over seeds), and the share of original captions its
    loaders drew (counted over every sample of every run, scripts/demo_train.py original_share)."""
    names = list(METRIC_LABELS)
    lines = ["| Method | " + " | ".join(names) + " | original captions drawn | texts per image |",
             "|---|" + "---|" * (len(names) + 2)]
    for m in data:
        cells = [fmt(*mean_std(per_seed(data, m, cfg, name))) for name in names]
        drawn = [r["texts_drawn"] for k, r in runs.items() if k.rsplit("-seed", 1)[0] == m and r.get("texts_drawn")]
        share = (f"{100 * sum(d['original'] for d in drawn) / sum(d['samples'] for d in drawn):.2f}%"
                 if drawn else "-")
        texts = f"{drawn[0]['mean_texts']:.2f}" if drawn else "-"
        lines.append(f"| {methods[m][0]} | " + " | ".join(cells) + f" | {share} | {texts} |")
    lines.append("| *chance* | " + " | ".join(
        f"*{c:.2f}*" if (c := metric_chance(chance, cfg, name)) is not None else "-" for name in names) + " | | |")
    return "\n".join(lines)


def primary_curves(data: dict, cfg, method: str) -> tuple[list[int], np.ndarray]:
    """(steps, [seeds, checkpoints]) of the primary metric on the held-out split at every checkpoint."""
    curves = [c for c in data[method]["curves"] if c]
    if not curves:
        return [], np.zeros((0, 0))
    n = min(len(c) for c in curves)
    ys = np.array([[metric_value(v, cfg, cfg.primary_metric) or 0.0 for _, v in c[:n]] for c in curves])
    return [s for s, _ in curves[0][:n]], ys


# One (line style, marker) per method, each pair distinct, and the earlier methods drawn wider: a method whose
# curve equals another's (e.g. CLIP's) still shows around and between the markers of the one drawn over it.
LINE_STYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3))]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def line_style(i: int) -> dict:
    """Matplotlib keywords of the i-th method's lines."""
    return {"linestyle": LINE_STYLES[i % len(LINE_STYLES)], "marker": MARKERS[i % len(MARKERS)],
            "linewidth": max(1.0, 2.8 - 0.3 * i), "markersize": max(4.0, 9.0 - 0.8 * i), "markerfacecolor": "none"}


def eval_ticks(steps: list[int], most: int = 12) -> list[int]:
    """The x ticks of the zero-shot panel: the evaluation steps (every k-th when there are more than
    `most`, always the last)."""
    steps = sorted(set(steps))
    k = -(-len(steps) // most)
    return sorted(set(steps[::-1][::k]))


def figure(data: dict, cfg, methods: dict, chance: float | None = None):
    """curves.png's figure: the training loss (moving average) and the primary metric at each evaluation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    evaluated = []
    for i, (m, d) in enumerate(data.items()):
        label, style = methods[m][0], line_style(i)
        if d["loss"]:
            n = min(len(x) for x in d["loss"])
            steps = [s for s, _ in d["loss"][0][:n]]
            loss = np.mean([[v for _, v in x[:n]] for x in d["loss"]], axis=0)
            k = max(1, n // 30)  # moving average: the per-step loss is noisy at batch 128
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax1.plot(steps[k - 1:], smooth, label=label, markevery=max(1, len(smooth) // 8), zorder=10 - i,
                     **style)
        steps, ys = primary_curves(data, cfg, m)
        if steps:
            evaluated += steps
            ax2.plot(steps, ys.mean(0), label=label, zorder=10 - i, **style)
            if len(ys) > 1:
                ax2.fill_between(steps, ys.mean(0) - ys.std(0, ddof=1), ys.mean(0) + ys.std(0, ddof=1), alpha=0.2)
    ax1.set(xlabel="step", ylabel="training loss (moving average)", title="Training loss")
    if chance is not None:
        ax2.axhline(chance, color="grey", linestyle=":", label="chance")
    if evaluated:
        ax2.set_xticks(eval_ticks(evaluated))
    ax2.set(xlabel="step (evaluations)", ylabel=f"{cfg.primary_metric} %",
            title=f"Held-out {cfg.primary_metric} (primary), mean ± sd")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot(data: dict, cfg, methods: dict, path: Path, chance: float | None = None) -> None:
    import matplotlib.pyplot as plt
    fig = figure(data, cfg, methods, chance)
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def diagnosis(data: dict, cfg, info: dict) -> list[str]:
    """The usual reasons LaCLIP would not help, measured on this run."""
    lines = noise_floor(data, cfg, info)
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
                     f"advance): {sum(dropped.values())} LLM rewrites dropped "
                     f"({', '.join(f'{k} {v}' for k, v in dropped.items())}); "
                     f"{kept} of {filtered.get('samples')} training images keep at least one rewrite (mean "
                     f"fidelity of the LLM rewrites {rw.get('llm_fidelity', {}).get('mean')}).")
    human = info["packs"].get("human", {}).get("text_counts")
    if human:
        lines.append(f"- **Human alt texts** (the oracle): {human.get('with_rewrites', 0)} of {human.get('samples')} "
                     f"training images have another human text (clip art: title, description, keywords; emoji: "
                     f"aliases); {human.get('texts', 0) - human.get('samples', 0)} texts besides the captions.")
    for s in rw.get("shipped", []):
        lines.append(f"- Shipped store {s['path']}: {s['engine']} / {s['model']} seed {s['seed']}, pools "
                     f"{', '.join(s['pools'])}, {s['shard_files']} shard files, "
                     f"{s['matched_train']} training captions.")
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
    steps_, ys = primary_curves(data, cfg, "clip") if "clip" in data else ([], None)
    if steps_:
        c, sd = ys.mean(0), (ys.std(0, ddof=1) if len(ys) > 1 else np.zeros(len(steps_)))
        peak = int(np.argmax(c))
        trend = ("highest at the last checkpoint: still improving, so training is short of the regime where "
                 "text over-fitting limits CLIP" if peak == len(c) - 1 else
                 f"highest at step {steps_[peak]} ({c[peak]:.2f} ± {sd[peak]:.2f} over seeds) and ended at "
                 f"{c[-1]:.2f} ± {sd[-1]:.2f}: " + ("it fell by more than the seeds' spread, so more steps on the "
                                                    "same captions hurt it" if c[peak] - c[-1] > max(sd[peak], sd[-1])
                                                    else "a fall within the seeds' spread"))
        level = metric_chance(info.get("chance", {}), cfg, cfg.primary_metric)
        lines.append(f"- **Over-fitting check** (the primary metric, {cfg.primary_metric}, mean over seeds"
                     + (f"; chance {level:.2f}" if level is not None else "") + f"): CLIP's was {trend}.")
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
    captions = {r["key"]: r["caption"] for r in jsonl_rows(out / "rewrites" / "train" / "captions.jsonl")}
    sources: dict[str, list] = {}
    for row in jsonl_rows(out / "rewrites" / "llm.jsonl"):
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
        rows.append(f"| rewrite, live ({live.get('engine', 'hf')} + SmolLM2, CPU) | "
                    f"{live.get('captions_per_s')} captions/s | "
                    f"{live['captions']} captions x pools {pools} ({live.get('seconds')} s) |")
    if rw.get("eda"):
        rows.append(f"| rewrite, EDA baseline | {rw['eda'].get('captions_per_s')} captions/s | "
                    f"{rw['eda'].get('captions')} captions ({rw['eda'].get('seconds')} s) |")
    for name, p in info["packs"].items():
        rows.append(f"| pack '{name}' (packing.pack, FFCV + DALI files) | {p.get('samples_per_s')} samples/s | "
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
    chance = info["chance"] = chance_levels(cfg, info["data"]["sets"])
    tab = table(data, cfg, methods, chance)
    plot(data, cfg, methods, out / "curves.png", metric_chance(chance, cfg, cfg.primary_metric))
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
          "method trains on" + (" (except 'LaCLIP, human alt texts', which trains on that kind of text for the "
                                "training images, so for it these columns are in-distribution)"
                                if "laclip_human" in cfg.methods else "")
          + ("; ZS Emoji's classes are Unicode block names, which no caption teaches: left out of the zero-shot "
             "headline" if "emoji" in cfg.datasets else "")
          + (f"; F-MNIST = Fashion-MNIST ({cfg.fmnist_max_per_split} train / test images): zero-shot, 5-way 5-shot "
             "prototypes, linear probe" if cfg.fmnist_max_per_split else "") + ".",
          "",
          "Headline metrics (each the mean of its columns above; its chance level computed the same way) and "
          "the share of original captions each method's loaders drew (counted over every sample of every run):",
          "",
          headline_table(data, cfg, methods, chance, info.get("runs", {})),
          "",
          "## Does LaCLIP beat CLIP here? (the pre-registered primary test)",
          "",
          *verdict(data, cfg, info["labels"], chance),
          "",
          f"Exploratory secondary comparisons (paired by seed id; Holm-adjusted across these rows at {cfg.alpha}; "
          "no verdict is drawn from them):",
          "",
          secondary_table(data, cfg, info["labels"]),
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
    cfg = DemoConfig(**load_json(root / "config.json"))
    stages = {p.stem: load_json(p)["result"] for p in sorted((root / "stages").glob("*.json"))}
    info = {"data": stages["data"], "rewrite": stages["rewrite"], "loader": stages.get("loader"),
            "packs": {k[5:]: v for k, v in stages.items() if k.startswith("pack-")},
            "runs": {k[6:]: v for k, v in stages.items() if k.startswith("train-")}}
    print(write_report(root, cfg, METHODS, info))
