"""Methods against CLIP, paired by seed id: the pre-registered primary test (scripts/demo_config.py
primary_method, primary_metric), its verdict in fixed wording, and the exploratory secondaries with Holm's
correction. Every number is computed from this run's per-seed results, never assumed.

The primary test: a two-sided paired t-test (n - 1 df) of the per-seed differences, the exact sign-flip
permutation p over all 2^n sign patterns, and the difference the seeds detect with 80% power (the
non-central t). The verdict reads the t-test alone: significant gain, significant loss or inconclusive.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from scripts.demo_results import OTHER, TAUGHT_BY_CAPTIONS, cfg_columns

# metric name -> (label, which table columns it averages: zero-shot on sets captions can teach, retrieval
# with the captions, retrieval with each image's other human text)
METRIC_LABELS = {"zeroshot": "zero-shot top-1 (mean of the held-out sets whose classes captions can teach)",
                 "retrieval": "retrieval R@5 (mean of both directions and sets, captions as texts)",
                 "retrieval_other": f"retrieval R@5 with the images' other human texts ({OTHER}: not the "
                                    "training captions; mean of both directions and sets)"}


def metric_columns(cfg, metric: str) -> list[str]:
    """The table columns a headline metric is the mean of."""
    cols = cfg_columns(cfg)
    if metric == "zeroshot":
        return [h for h, _, ds, path in cols if path == "zeroshot/top1" and ds.startswith("captions:")
                and ds.removeprefix("captions:heldout-") in TAUGHT_BY_CAPTIONS]
    return [h for h, *_ in cols if "R@5" in h and (OTHER in h) == (metric == "retrieval_other")]


def metric_value(values: dict, cfg, metric: str) -> float | None:
    """One seed's (or checkpoint's) headline metric from its column values {header: value}: the mean of
    its columns that have a value (a held-out set too small to build, e.g. a few dozen emoji's aliases, has
    none for any method or seed)."""
    vals = [v for v in (values.get(h) for h in metric_columns(cfg, metric)) if v is not None]
    return float(np.mean(vals)) if vals else None


def metric_chance(chance: dict, cfg, metric: str) -> float | None:
    """Chance of a headline metric, computed as the metric is: the mean of its columns' chance levels."""
    vals = [chance.get(h) for h in metric_columns(cfg, metric)]
    return float(np.mean(vals)) if vals and None not in vals else None


def per_seed(data: dict, method: str, cfg, metric: str) -> list[float | None]:
    """The metric of every seed id 0..seeds-1 (None where that seed has no result)."""
    final = data[method]["final"]
    return [metric_value({h: v[s] for h, v in final.items()}, cfg, metric) for s in range(cfg.seeds)]


class MissingSeed(ValueError):
    """A seed has a result for one method and not the other: pairs are by seed id, never shifted."""


def paired_differences(data: dict, cfg, method: str, metric: str, base: str = "clip") -> list[float] | None:
    """method - base per seed id, for every seed id; None when either method has no result at all."""
    if method not in data or base not in data:
        return None
    a, b = per_seed(data, base, cfg, metric), per_seed(data, method, cfg, metric)
    if all(x is None for x in a) or all(y is None for y in b):
        return None
    missing = [s for s, (x, y) in enumerate(zip(a, b)) if x is None or y is None]
    if missing:
        raise MissingSeed(f"{method} vs {base} on {metric}: seed(s) {missing} of 0..{cfg.seeds - 1} have no "
                          "result for one of them (pairs are by seed id; finish or drop those runs, or set seeds)")
    return [y - x for x, y in zip(a, b)]


def sign_flip_p(diffs) -> float:
    """Exact two-sided permutation p of the mean under H0 (each difference's sign is a fair coin): the share
    of the 2^n sign patterns whose |mean| is at least the observed one."""
    d = np.asarray(diffs, dtype=np.float64)
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    means = np.abs(signs @ d) / len(d)
    return float(np.mean(means >= abs(d.mean()) - 1e-12 * max(1.0, abs(d).max())))


def t_power(nc: float, df: int, crit: float) -> float:
    """P(|T| > crit) for T non-central t (df, nc): scipy's nct, or where it gives NaN (1 df, far tail) the
    same probability as an integral over the chi-square of T's denominator."""
    from scipy import integrate, stats
    power = stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)
    if np.isfinite(power):
        return float(power)

    def density(v):  # T = (Z + nc) / sqrt(V / df), V ~ chi2(df)
        s = crit * math.sqrt(v / df)
        return stats.chi2.pdf(v, df) * (stats.norm.sf(s - nc) + stats.norm.cdf(-s - nc))
    return float(integrate.quad(density, 0, np.inf, limit=200)[0])


def detectable_80(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The true mean difference a two-sided paired t-test at `alpha` detects with probability `power`,
    with this sd over n seeds (the non-central t, noncentrality delta / (sd / sqrt n))."""
    from scipy import optimize, stats
    if n < 2 or not sd > 0:
        return float("nan") if n < 2 else 0.0
    df, crit = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)
    hi = 2 * crit + 5
    while t_power(hi, df, crit) < power:
        hi *= 2
    nc = optimize.brentq(lambda x: t_power(x, df, crit) - power, 0.0, hi)
    return float(nc * sd / math.sqrt(n))


def paired_test(diffs, alpha: float = 0.05) -> dict:
    """Everything the report says about one paired comparison."""
    from scipy import stats
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    out = {"n": n, "mean": float(d.mean()), "sd": float(d.std(ddof=1)) if n > 1 else float("nan")}
    if n < 2:
        return {**out, "p": float("nan"), "p_sign_flip": float("nan"), "detectable_80": float("nan")}
    se = out["sd"] / math.sqrt(n)
    p = (0.0 if out["mean"] != 0 else 1.0) if se == 0 else float(2 * stats.t.sf(abs(out["mean"] / se), n - 1))
    return {**out, "p": p, "p_sign_flip": sign_flip_p(d), "detectable_80": detectable_80(out["sd"], n, alpha)}


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p values, in the input order."""
    order = np.argsort(pvalues)
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


VERDICTS = {"gain": "significant gain", "loss": "significant loss", "inconclusive": "inconclusive"}


def call(test: dict, alpha: float) -> str:
    """The verdict of the primary test alone: "gain", "loss" or "inconclusive"."""
    if test["n"] < 2 or not test["p"] < alpha:
        return "inconclusive"
    return "gain" if test["mean"] > 0 else "loss"


def fmt_test(t: dict) -> str:
    return (f"{t['mean']:+.2f} ± {t['sd']:.2f} (mean ± sd of the paired difference, n = {t['n']} seeds; paired "
            f"t-test p = {t['p']:.4f}; exact sign-flip p = {t['p_sign_flip']:.4f}; detectable with 80% power: "
            f"±{t['detectable_80']:.2f})")


def primary(data: dict, cfg) -> dict | None:
    diffs = paired_differences(data, cfg, cfg.primary_method, cfg.primary_metric)
    return None if diffs is None else {"diffs": diffs, **paired_test(diffs, cfg.alpha)}


def verdict(data: dict, cfg, labels: dict, chance: dict | None = None) -> list[str]:
    """The generated verdict: the primary comparison's numbers and its call in fixed wording."""
    method, metric = cfg.primary_method, cfg.primary_metric
    label = labels.get(method, method)
    t = primary(data, cfg)
    if t is None:
        return [f"(CLIP or {label} was not run: no primary comparison.)"]
    clip, other = per_seed(data, "clip", cfg, metric), per_seed(data, method, cfg, metric)
    level = metric_chance(chance or {}, cfg, metric)
    lines = [f"- Primary metric (fixed before the run): {METRIC_LABELS[metric]}, at the final step. CLIP "
             f"{np.mean(clip):.2f}, {label} {np.mean(other):.2f}"
             + (f" (chance {level:.2f})" if level is not None else "") + ".",
             f"- {label} − CLIP = {fmt_test(t)}.",
             f"- Per seed (seed 0..{t['n'] - 1}): " + ", ".join(f"{x:+.2f}" for x in t["diffs"]) + "."]
    c = call(t, cfg.alpha)
    if t["n"] < 2:
        text = f"**Verdict: inconclusive** (one seed measures no spread) for {label} vs CLIP."
    elif c == "inconclusive":
        text = (f"**Verdict: inconclusive.** {label} vs CLIP on the primary metric: p = {t['p']:.4f} ≥ "
                f"{cfg.alpha}; a true difference smaller than about ±{t['detectable_80']:.2f} points would "
                f"usually go undetected with {t['n']} seeds.")
    else:
        text = (f"**Verdict: {VERDICTS[c]}.** {label} vs CLIP on the primary metric: {t['mean']:+.2f} points, "
                f"p = {t['p']:.4f} < {cfg.alpha}.")
    return lines + [f"- {text}"]


def secondaries(data: dict, cfg) -> list[tuple[str, str, str, str]]:
    """The exploratory comparisons (method, base, metric): every other method vs CLIP on the primary
    metric, the primary method vs CLIP on the other metrics, and the primary method vs its 1-rewrite arm
    (the paper's scaling claim) when both ran."""
    out = [(m, "clip", cfg.primary_metric) for m in cfg.methods if m not in ("clip", cfg.primary_method)]
    out += [(cfg.primary_method, "clip", m) for m in METRIC_LABELS if m != cfg.primary_metric]
    if "laclip_1" in cfg.methods and cfg.primary_method != "laclip_1":
        out.append((cfg.primary_method, "laclip_1", cfg.primary_metric))
    return out


def secondary_table(data: dict, cfg, labels: dict) -> str:
    """Exploratory: each secondary comparison's paired difference, raw and Holm-adjusted p (Holm across
    all of them), sign-flip p and 80%-power detectable difference."""
    rows = []
    for method, base, metric in secondaries(data, cfg):
        diffs = paired_differences(data, cfg, method, metric, base)
        if diffs is not None and len(diffs) >= 2:
            rows.append((method, base, metric, paired_test(diffs, cfg.alpha)))
    if not rows:
        return "(no secondary comparison with 2 or more seeds)"
    adjusted = holm([t["p"] for *_, t in rows])
    lines = ["| comparison | metric | mean ± sd | t-test p | Holm p | sign-flip p | detectable (80%) |",
             "|---|---|---|---|---|---|---|"]
    for (method, base, metric, t), p_holm in zip(rows, adjusted):
        lines.append(f"| {labels.get(method, method)} − {labels.get(base, base)} | {metric} | "
                     f"{t['mean']:+.2f} ± {t['sd']:.2f} | {t['p']:.4f} | {p_holm:.4f} | {t['p_sign_flip']:.4f} | "
                     f"±{t['detectable_80']:.2f} |")
    return "\n".join(lines)


def noise_floor(data: dict, cfg, info: dict) -> list[str]:
    """Test-set sampling error of CLIP's primary metric: the binomial error over the held-out queries."""
    metric = cfg.primary_metric
    clip = [x for x in per_seed(data, "clip", cfg, metric) if x is not None] if "clip" in data else []
    sets = info["data"]["sets"]
    n = sum(v.get("other_wording" if metric == "retrieval_other" else "heldout", 0) for v in sets.values())
    if not clip or not n:
        return []
    p = float(np.mean(clip)) / 100
    return [f"- Noise scale: the primary metric has {n} held-out queries per direction, so a recall near "
            f"{100 * p:.1f}% carries a sampling error of about ±{100 * math.sqrt(p * (1 - p) / n):.1f} points "
            "per seed (the seeds' spread above already includes it)."]
