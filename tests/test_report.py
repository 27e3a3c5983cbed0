"""Every verdict branch of the demo report (scripts/report.py, demo_stats.py, demo_results.py) on
made-up per-seed results: the primary test's verdict (gain, loss, inconclusive), the exact sign-flip p, the
80%-power detectable difference, Holm, pairing by seed id, chance levels and the over-fitting check."""
from types import SimpleNamespace

import numpy as np
import pytest

from scripts import demo_results as results, demo_stats as stats, report

DATASETS = ["emoji", "openclipart"]
CFG = SimpleNamespace(datasets=DATASETS, checkpoint_every=50, steps=300, other_wording=[])
INFO = {"data": {"sets": {d: {"train": 900, "heldout": 100, "categories": 10} for d in DATASETS}},
        "labels": {"clip": "CLIP", "laclip": "LaCLIP", "laclip_1": "LaCLIP, 1 rewrite", "laclip_mt": "LaCLIP-MT",
                   "eda": "EDA"},
        "packs": {"llm": {"text_counts": {"samples": 1000, "with_rewrites": 300, "max_texts": 5,
                                          "texts": 1900}}},
        "rewrite": {}, "global_batch": 64}


def method(zs: list, r5: list, curve=None) -> dict:
    """One method's results per seed: zero-shot top-1 and retrieval R@5 (the same on every set)."""
    final = {}
    for head, _, _, path in results.columns(DATASETS):
        final[head] = list(zs) if path == "zeroshot/top1" else list(r5) if "R@5" in path else [None] * len(zs)
    curves = [curve] * len(zs) if curve else []
    return {"final": final, "curves": curves, "loss": [[(1, 4.0), (2, 3.5)]] * len(zs), "train_sps": [10.0]}


CLIP3 = method([30.0, 32.0, 31.0], [50.0, 52.0, 51.0])
LABELS = {"clip": ("CLIP",), "laclip": ("LaCLIP",), "laclip_1": ("LaCLIP, 1 rewrite",), "eda": ("EDA",)}


def cfg(seeds, metric="zeroshot", methods=("clip", "laclip")):
    return SimpleNamespace(**{**vars(CFG), "seeds": seeds, "primary_method": "laclip", "primary_metric": metric,
                              "alpha": 0.05, "methods": list(methods)})


def verdict_lines(data, seeds=3, metric="zeroshot") -> list[str]:
    return stats.verdict(data, cfg(seeds, metric), INFO["labels"])


def test_verdict_without_both_methods():
    assert verdict_lines({"clip": CLIP3}) == ["(CLIP or LaCLIP was not run: no primary comparison.)"]


CLIP8 = [30.0, 32.0, 31.0, 29.5, 33.0, 30.5, 31.5, 32.5]


@pytest.mark.parametrize("shift, call", [
    ([5.0, 5.5, 4.5, 5.2, 4.8, 5.1, 4.9, 5.3], "**Verdict: significant gain.**"),      # about +5 every seed
    ([-5.0, -5.5, -4.5, -5.2, -4.8, -5.1, -4.9, -5.3], "**Verdict: significant loss.**"),
    ([2.0, -2.5, 1.0, -1.0, 0.5, -0.5, 1.5, -1.2], "**Verdict: inconclusive.**"),      # mean -0.025, sd 1.5
])
def test_each_verdict_branch_on_made_up_numbers(shift, call):
    """The verdict reads the primary metric's paired t-test alone, in fixed wording."""
    from scipy import stats as sps
    laclip = [c + d for c, d in zip(CLIP8, shift)]
    # retrieval (a secondary metric here) is 40 points worse on every seed: it never enters the verdict
    lines = verdict_lines({"clip": method(CLIP8, [50.0] * 8), "laclip": method(laclip, [10.0] * 8)}, seeds=8)
    assert lines[-1].startswith(f"- {call}"), lines
    p = sps.ttest_rel(laclip, CLIP8).pvalue
    assert f"paired t-test p = {p:.4f}" in lines[1] and "n = 8 seeds" in lines[1]


def test_sign_flip_p_is_exact():
    """All 2^n sign patterns: 8 differences of one sign reach 2 / 256, the smallest p 8 seeds allow;
    3 seeds cannot go below 2 / 8 = 0.25."""
    assert stats.sign_flip_p([1.0] * 8) == pytest.approx(2 / 256)
    assert stats.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(0.25)
    # |sum| of (+1 +1 -1 +3) is 4: with the 3's sign fixed, the other three signs sum to +3 (1 way) or +1
    # (3 ways) to reach it, so 2 x 4 of the 16 patterns
    assert stats.sign_flip_p([1.0, 1.0, -1.0, 3.0]) == pytest.approx(8 / 16)


def test_detectable_80_is_the_non_central_t_power():
    """At the returned difference a paired t-test at 5% rejects 80% of the time (checked by simulation
    to 0.01: 20000 draws give a binomial sd of 0.003), and it is larger than the 95% half-width."""
    from scipy import stats as sps
    rng = np.random.default_rng(0)
    for sd, n in ((2.0, 8), (2.0, 2)):  # 2 seeds: 1 df, where scipy's nct gives NaN and the integral serves
        delta = stats.detectable_80(sd, n)
        diffs = rng.normal(delta, sd, size=(20000, n))
        p = sps.ttest_1samp(diffs, 0.0, axis=1).pvalue
        assert np.mean(p < 0.05) == pytest.approx(0.8, abs=0.01), n
        assert delta > sps.t.ppf(0.975, n - 1) * sd / np.sqrt(n)
    assert stats.detectable_80(sd, 3) / (sps.t.ppf(0.975, 2) * sd / np.sqrt(3)) == pytest.approx(1.34, abs=0.03)


def test_holm():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])


def test_a_missing_seed_is_an_error_never_a_shifted_pair():
    """Seed 1 of LaCLIP has no result: pairing by list position would compare LaCLIP's seed 2 with CLIP's
    seed 1; pairing by seed id refuses."""
    laclip = method([35.0, None, 36.0], [51.0, None, 52.0])
    with pytest.raises(stats.MissingSeed, match=r"seed\(s\) \[1\]"):
        verdict_lines({"clip": CLIP3, "laclip": laclip})


def test_secondaries_are_holm_adjusted():
    c = cfg(8, "retrieval", methods=("clip", "laclip", "laclip_1"))
    data = {"clip": method(CLIP8, CLIP8), "laclip": method([x + 1 for x in CLIP8], [x + 3 + 0.1 * i for i, x in
                                                                                   enumerate(CLIP8)]),
            "laclip_1": method([x - 1 for x in CLIP8], [x + 0.2 * (-1) ** i for i, x in enumerate(CLIP8)])}
    text = stats.secondary_table(data, c, INFO["labels"])
    rows = [line for line in text.splitlines()[2:]]
    raw = [float(r.split("|")[4]) for r in rows]
    adjusted = [float(r.split("|")[5]) for r in rows]
    assert adjusted == pytest.approx(stats.holm(raw), abs=1e-4) and max(adjusted) <= 1.0
    assert any(r.startswith("| LaCLIP − LaCLIP, 1 rewrite | retrieval |") for r in rows)


def test_chance_row_and_headline_chance():
    chance = results.chance_levels(CFG, INFO["data"]["sets"])
    assert chance["ZS Emoji (Unicode blocks) top-1"] == 10.0 and chance["F-MNIST 5w5s"] == 20.0
    assert chance[[h for h, *_ in results.columns(DATASETS) if "R@5" in h][0]] == 5.0
    text = report.table({"clip": CLIP3}, CFG, {"clip": ("CLIP",)}, chance)
    assert text.splitlines()[-1].startswith("| *chance* | *10.0* |")
    # the zero-shot headline leaves the Unicode-block classes out: its chance is the clip art's alone
    sets = {"emoji": {"heldout": 100, "categories": 10}, "openclipart": {"heldout": 100, "categories": 20,
                                                                         "heldout_categories": 16}}
    assert stats.metric_chance(results.chance_levels(CFG, sets), CFG, "zeroshot") == 100 / 16


@pytest.mark.parametrize("curve, says", [
    ([(50, 20.0), (100, 25.0), (150, 28.0)], "highest at the last checkpoint: still improving"),
    ([(50, 20.0), (100, 29.0), (150, 26.0)], "highest at step 100 (29.00 ± 0.00 over seeds) and ended at 26.00"),
])
def test_overfitting_check_reads_the_primary_metric(curve, says):
    c = cfg(1, "zeroshot")
    zs = [h for h in stats.metric_columns(c, "zeroshot")]
    data = {"clip": method([30.0], [50.0])}
    data["clip"]["curves"] = [[(s, {h: v for h in zs}) for s, v in curve]]
    lines = report.diagnosis(data, c, INFO)
    (check,) = [line for line in lines if "Over-fitting check" in line]
    assert says in check
    length = next(line for line in lines if "Training length" in line)
    assert "19.2 epochs" in length


def test_fidelity_section_histograms_and_threshold_counts(tmp_path):
    """The report's fidelity section: per source, counts below the method's threshold from the scores
    themselves, examples, and the histogram figure."""
    import json
    train = tmp_path / "rewrites" / "train"
    train.mkdir(parents=True)
    (train / "captions.jsonl").write_text("".join(json.dumps({"key": k, "caption": f"a {k}"}) + "\n"
                                                  for k in ("cat", "dog")))
    rows = [{"key": "cat", "rewrites": ["a kitten", "a car", "a tabby cat"], "scores": [0.71, 0.2, 0.5],
             "styles": ["coco", "coco", "human"]},
            {"key": "dog", "rewrites": ["a puppy"], "scores": [0.49], "styles": ["coco"]},
            {"key": "elsewhere", "rewrites": ["x"], "scores": [0.1], "styles": ["coco"]}]  # not a training image
    (tmp_path / "rewrites" / "llm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = report.fidelity_section(tmp_path, SimpleNamespace(min_fidelity=0.5))
    table = {line.split("|")[1].strip(): line for line in lines if line.startswith("| LLM")}
    assert set(table) == {"LLM coco", "LLM human"}
    assert table["LLM coco"].startswith("| LLM coco | 3 | 0.47 |") and table["LLM coco"].endswith("| 67% |")
    assert table["LLM human"].endswith("| 0% |")  # 0.5 is kept: the threshold is inclusive
    assert any("LLM coco, low: 0.20: 'a cat' -> 'a car'" in line for line in lines)
    assert (tmp_path / "fidelity.png").stat().st_size > 5000
    assert report.fidelity_section(tmp_path / "nothing", SimpleNamespace(min_fidelity=0.5)) == []


def test_curves_show_every_line_and_tick_the_evaluations():
    """curves.png: LaCLIP's zero-shot curve equals CLIP's point for point, yet each method keeps its own
    line style and marker (hollow, the earlier drawn wider), and the zero-shot panel's ticks are the
    evaluation steps."""
    import matplotlib.pyplot as plt
    c = cfg(1, "zeroshot", methods=("clip", "laclip", "eda"))
    zs = stats.metric_columns(c, "zeroshot")
    evals = [50, 100, 150, 300]
    data = {m: method([30.0], [50.0]) for m in c.methods}
    for m, shift in (("clip", 0.0), ("laclip", 0.0), ("eda", 3.0)):  # CLIP and LaCLIP: the same numbers
        data[m]["curves"] = [[(s, {h: 20.0 + shift + s / 50 for h in zs}) for s in evals]]
    fig = report.figure(data, c, LABELS, chance=10.0)
    loss_ax, zs_ax = fig.axes
    lines = {ln.get_label(): ln for ln in zs_ax.get_lines() if ln.get_label() in ("CLIP", "LaCLIP", "EDA")}
    assert np.array_equal(lines["CLIP"].get_ydata(), lines["LaCLIP"].get_ydata())
    styles = {(str(ln.get_linestyle()), ln.get_marker()) for ln in lines.values()}
    assert len(styles) == 3, styles
    assert lines["CLIP"].get_linewidth() > lines["LaCLIP"].get_linewidth()
    assert lines["CLIP"].get_markersize() > lines["LaCLIP"].get_markersize()
    assert list(zs_ax.get_xticks()) == evals
    loss_styles = {str(ln.get_linestyle()) for ln in loss_ax.get_lines()}
    assert len(loss_styles) == 3, loss_styles
    plt.close(fig)
    # many evaluations: a subset of them, always the last, never a step between evaluations
    many = list(range(25, 2001, 25))
    ticks = report.eval_ticks(many)
    assert len(ticks) <= 12 and ticks[-1] == 2000 and set(ticks) <= set(many)
