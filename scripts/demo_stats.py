"""Every method against CLIP, paired by seed: the per-seed headline metrics, the two-sided paired t-test
with n - 1 degrees of freedom and the smallest difference the seeds could detect, the verdict and the
noise scales that bound what a difference can mean. Computed from this run's numbers, never assumed."""
from __future__ import annotations

import math

import numpy as np

from scripts.demo_results import OTHER, cfg_columns


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
