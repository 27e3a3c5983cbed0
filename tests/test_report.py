"""Every verdict branch of the demo report (scripts/report.py, demo_stats.py, demo_results.py) on
constructed per-seed results: the call on LaCLIP vs CLIP, the noise floor, the text-augmentation control
and the over-fitting check."""
from types import SimpleNamespace

import numpy as np
import pytest

from scripts import demo_results as results, demo_stats as stats, report

DATASETS = ["emoji", "openclipart"]
CFG = SimpleNamespace(datasets=DATASETS, checkpoint_every=50, steps=300, other_wording=[])
INFO = {"data": {"sets": {d: {"train": 900, "heldout": 100, "categories": 10} for d in DATASETS}},
        "labels": {"clip": "CLIP", "laclip": "LaCLIP", "laclip_mt": "LaCLIP-MT", "eda": "EDA"},
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


def verdict_lines(data) -> list[str]:
    return stats.verdict(data, CFG, INFO)


def test_verdict_without_both_methods():
    assert verdict_lines({"clip": CLIP3}) == ["(CLIP or LaCLIP was not run: no comparison.)"]


@pytest.mark.parametrize("laclip_zs, call", [
    ([35.0, 37.1, 35.9], "LaCLIP **beats** CLIP"),              # +5 every seed
    ([25.0, 27.2, 25.8], "LaCLIP is **worse** than CLIP"),       # -5 every seed
    ([33.0, 29.0, 32.5], "**no difference detectable** with 3 seeds"),  # +0.5 +- 2
])
def test_verdict_three_seeds(laclip_zs, call):
    lines = verdict_lines({"clip": CLIP3, "laclip": method(laclip_zs, [51.0, 52.0, 51.0])})
    zs = next(line for line in lines if line.startswith("- zero-shot"))
    assert call in zs and "over 3 seeds" in zs


def test_verdict_one_seed_is_not_established():
    lines = verdict_lines({"clip": method([30.0], [50.0]), "laclip": method([40.0], [60.0])})
    assert all("**not established** (one seed" in line for line in lines[:2])
    assert "LaCLIP - CLIP = +10.0 on a single seed" in lines[0]


def test_verdict_is_a_paired_t_test_with_n_minus_1_df():
    """The call follows scipy's paired t-test (n - 1 df), not a 2-standard-error rule: with 3 seeds
    and t = 2.6 (p = 0.12) the old rule (beyond 2 standard errors) said "beats"; the t-test does not. The smallest detectable
    difference is t(0.975, n - 1) x se."""
    from scipy import stats
    clip, laclip = [30.0, 32.0, 31.0], [33.0, 33.0, 36.0]  # differences 3, 1, 5: mean 3, se 1.155
    lines = verdict_lines({"clip": method(clip, [50.0] * 3), "laclip": method(laclip, [50.0] * 3)})
    p = stats.ttest_rel(laclip, clip).pvalue
    assert 0.05 < p < 0.2 and 3 > 2 * 2 / np.sqrt(3)  # the old rule would have called it
    assert f"p = {p:.3f}" in lines[0] and "2 df" in lines[0] and "**no difference detectable**" in lines[0]
    smallest = stats.t.ppf(0.975, 2) * np.std([3, 1, 5], ddof=1) / np.sqrt(3)
    assert f"smallest detectable difference ±{smallest:.1f}" in lines[0]


def test_verdict_two_seeds_is_not_a_null_result():
    """Two seeds leave one degree of freedom: a consistent +10 is significant, and a non-significant
    result states how large a difference could hide (never a bare 'no difference')."""
    lines = verdict_lines({"clip": method([30.0, 31.0], [50.0, 51.0]),
                           "laclip": method([40.0, 41.5], [60.0, 61.0])})
    assert "LaCLIP **beats** CLIP" in lines[0] and "over 2 seeds" in lines[0]
    noisy = verdict_lines({"clip": method([30.0, 31.0], [50.0, 51.0]), "laclip": method([40.0, 29.0], [60.0, 61.0])})
    assert "could hide" in noisy[0]


def test_chance_row():
    chance = results.chance_levels(CFG, INFO["data"]["sets"])
    assert chance["ZS Emoji top-1"] == 10.0 and chance["F-MNIST 5w5s"] == 20.0
    assert chance[[h for h, *_ in results.columns(DATASETS) if "R@5" in h][0]] == 5.0
    text = report.table({"clip": CLIP3}, CFG, INFO["labels"] and {"clip": ("CLIP",)}, chance)
    assert text.splitlines()[-1].startswith("| *chance* | *10.0* |")


def test_verdict_skips_a_metric_with_no_paired_values():
    laclip = method([35.0, 37.0, 36.0], [None, None, None])
    lines = verdict_lines({"clip": CLIP3, "laclip": laclip})
    assert any(line.startswith("- zero-shot") for line in lines)
    assert not any(line.startswith("- retrieval") for line in lines)


def test_noise_floor_branches():
    wobbly = [(50, 20.0), (100, 25.0), (150, 24.0), (200, 27.0)]
    with_curve = stats.noise_floor({"clip": method([30.0], [50.0], curve=wobbly)}, CFG, INFO)
    assert len(with_curve) == 1 and "200 images" in with_curve[0] and "±3.2 points" in with_curve[0]
    assert "moves by 3.0 points on average" in with_curve[0]  # second half: |27 - 24|
    short = stats.noise_floor({"clip": method([30.0], [50.0], curve=wobbly[:2])}, CFG, INFO)
    assert short[0].endswith("points.")
    assert stats.noise_floor({}, CFG, INFO) == []


def _control(laclip_r5, mt_r5, eda_r5) -> list[str]:
    data = {"clip": CLIP3, "laclip": method([31.0] * 3, laclip_r5),
            "laclip_mt": method([31.0] * 3, mt_r5), "eda": method([31.0] * 3, eda_r5)}
    return stats.augmentation_control(data, CFG, INFO)


def test_augmentation_control_branches():
    worse, level = [40.0, 42.1, 40.9], [50.5, 51.0, 51.5]
    (line,) = _control(worse, [45.0, 47.0, 46.2], level)
    assert "varying the text is not what hurts" in line and line.endswith("loses less.")
    (line,) = _control(worse, [30.0, 32.0, 31.0], level)
    assert line.endswith("loses as much.")
    (line,) = _control(worse, worse, worse)
    assert "Both kinds of text augmentation cost accuracy" in line
    (line,) = _control(level, level, level)
    assert line.startswith("- **Text-augmentation control**") and "hurt" not in line
    two_seeds = {m: method([31.0] * 2, [40.0] * 2) for m in ("clip", "laclip", "laclip_mt", "eda")}
    assert stats.augmentation_control(two_seeds, CFG, INFO) == []


@pytest.mark.parametrize("curve, says", [
    ([(50, 20.0), (100, 25.0), (150, 28.0)], "highest at the last checkpoint: still improving"),
    ([(50, 20.0), (100, 29.0), (150, 26.0)], "highest at step 100 (29.0) and ended at 26.0"),
])
def test_overfitting_check(curve, says):
    lines = report.diagnosis({"clip": method([30.0], [50.0], curve=curve)}, CFG, INFO)
    (check,) = [line for line in lines if "Over-fitting check" in line]
    assert says in check
    coverage = next(line for line in lines if "Rewrite coverage" in line)
    assert "300 of 1000" in coverage and "mostly CLIP" in coverage
    length = next(line for line in lines if "Training length" in line)
    assert "19.2 epochs" in length and "Captions repeat many times" in length


def test_other_wording_columns_chance_and_differences():
    """Retrieval with other human texts is its own metric: its columns, chance from its own image count,
    and a column in the every-method table; a method never run against it shows '-'."""
    cfg = SimpleNamespace(**{**vars(CFG), "other_wording": ["openclipart"]})
    heads = [h for h, *_ in results.cfg_columns(cfg)]
    other = [h for h in heads if results.OTHER in h]
    assert other == [f"OpenClipart {results.OTHER} I→T R@5", f"OpenClipart {results.OTHER} T→I R@5"]
    sets = {d: {"train": 900, "heldout": 100, "categories": 10} for d in DATASETS}
    sets["openclipart"]["other_wording"] = 40
    assert results.chance_levels(cfg, sets)[other[0]] == 12.5

    def with_other(zs, r5, r5_other):
        m = method(zs, r5)
        m["final"].update({h: list(r5_other) for h in other})
        return m
    data = {"clip": with_other([30.0, 32.0, 31.0], [50.0, 52.0, 51.0], [20.0, 22.0, 21.0]),
            "laclip_human": with_other([30.0, 32.0, 31.0], [50.0, 52.0, 51.0], [30.0, 32.1, 30.9]),
            "eda": method([30.0, 32.0, 31.0], [50.0, 52.0, 51.0])}
    for m in ("clip", "eda"):
        data[m]["final"].setdefault(other[0], [None] * 3)
        data[m]["final"].setdefault(other[1], [None] * 3)
    text = stats.differences(data, cfg, {"laclip_human": "LaCLIP, human alt texts", "eda": "EDA"})
    human = next(line for line in text.splitlines() if line.startswith("| LaCLIP, human"))
    assert human.endswith("| **+10.0** ± 0.1 (p = 0.000; detectable ±0.2) |"), human
    eda = next(line for line in text.splitlines() if line.startswith("| EDA"))
    assert eda.endswith("| - |") and "+0.0 ± 0.0" in eda


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
