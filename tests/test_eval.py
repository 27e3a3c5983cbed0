"""eval.py and evaluation/: protocols on constructed models and real features, errors, end to end."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import eval as E
from evaluation.config import EvalConfig
from evaluation.datasets import DatasetError, load_class_names, open_eval_set
from evaluation.fewshot import fewshot, fewshot_episodes
from evaluation.probe import linear_probe
from evaluation.retrieval import retrieval
from evaluation.runner import evaluate_set
from evaluation.zeroshot import zeroshot_classifier
from model.clip import IMAGE_MEAN as CLIP_MEAN, IMAGE_STD as CLIP_STD
from model.tokenizer import get_tokenizer

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourCLIP(nn.Module):
    """Real torch layers wired so that an image of a pure colour and any text naming it map to the same
    one-hot direction: pooling + a linear layer that undoes CLIP's normalisation; a summing
    EmbeddingBag whose only non-zero rows are the colour words."""
    image_size, embed_dim = 16, 3

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.rgb = nn.Linear(3, 3)
        self.words = nn.EmbeddingBag(49408, 3, mode="sum")
        with torch.no_grad():
            self.rgb.weight.copy_(torch.diag(torch.tensor(CLIP_STD)))
            self.rgb.bias.copy_(torch.tensor(CLIP_MEAN))
            self.words.weight.zero_()
            for i, name in enumerate(COLOURS):
                (ids,) = get_tokenizer().encode([name])
                assert len(ids) == 1
                self.words.weight[int(ids[0]), i] = 1.0

    def encode_image(self, x):
        return self.rgb(self.pool(x).flatten(1))

    def encode_text(self, tokens):
        return self.words(tokens)


def _colour_folder(root, n=4):
    for split in ("train", "test"):
        for name, rgb in COLOURS.items():
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20 + i, 24), rgb).save(d / f"{i}.png")
    return root


def test_zeroshot_on_agreeing_embeddings_is_100(tmp_path):
    ds = open_eval_set(f"folder:{_colour_folder(tmp_path / 'colours')}", tmp_path)
    cfg = EvalConfig(protocols=["zeroshot"], cache_dir=str(tmp_path / "cache"), workers=0)
    out = evaluate_set(ColourCLIP().eval(), ds, cfg, "k", "cpu")["zeroshot"]
    assert out["top1"] == 100.0 and out["mean_per_class"] == 100.0
    assert "top5" not in out                        # fewer than 5 classes


def test_templates_ensembled_as_mean_of_normalised_then_renormalised():
    torch.manual_seed(0)
    model = ColourCLIP()
    with torch.no_grad():
        model.words.weight.normal_()
    names, templates = ["cat", "dog", "red car"], ["a photo of a {}.", "a drawing of the {}.", "{}"]
    w = zeroshot_classifier(model, names, templates, "cpu")
    tok = get_tokenizer()
    for c, name in enumerate(names):
        emb = torch.nn.functional.normalize(model.encode_text(tok([t.format(name) for t in templates])), dim=-1)
        expected = torch.nn.functional.normalize(emb.mean(0), dim=0)
        torch.testing.assert_close(w[:, c], expected.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(w[:, c], emb[0].detach(), atol=1e-3)


def test_fewshot_episodes_disjoint_and_reproducible():
    labels = np.repeat(np.arange(8), [30, 30, 30, 30, 30, 30, 9, 3])
    kw = dict(ways=5, shots=5, queries=15, episodes=50)
    a = list(fewshot_episodes(labels, seed=1, **kw))
    b = list(fewshot_episodes(labels, seed=1, **kw))
    c = list(fewshot_episodes(labels, seed=2, **kw))
    for (s, sy, q, qy), (s2, sy2, q2, qy2) in zip(a, b):
        assert not set(s) & set(q)
        assert len(set(labels[s])) == 5 and 7 not in labels[s]     # class 7 (3 images) is not eligible
        for k in range(5):                                         # episode label k = one real class
            assert len(set(labels[s[sy == k]]) | set(labels[q[qy == k]])) == 1
        assert len(q) == 5 * 4                                     # 9-image class leaves 4 queries
        np.testing.assert_array_equal(s, s2), np.testing.assert_array_equal(q, q2)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_fewshot_separable_features_score_100():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 25)
    feats = np.eye(6)[labels] * 5 + rng.normal(0, 0.05, (150, 6))
    out = fewshot(feats.astype(np.float32), labels, feats.mean(0).astype(np.float32), episodes=40)
    assert out["accuracy"] == 100.0 and out["episodes"] == 40


@pytest.mark.parametrize("name", ["digits", pytest.param("fashion_mnist", marks=pytest.mark.slow)])
def test_linear_probe_agrees_with_sklearn(name):
    ds = open_eval_set(name, "/nonexistent")
    tr, te = ds.splits["train"], ds.splits["test"]
    n_tr, n_te = min(len(tr), 1500), min(len(te), 1000)
    x = lambda s, n: s.arrays[:n].reshape(n, -1).astype(np.float32) / 255   # noqa: E731
    args = (x(tr, n_tr), tr.labels[:n_tr], x(te, n_te), te.labels[:n_te])
    ours = linear_probe(*args, n_classes=10, tol=1e-6)    # both solvers converged tightly
    ref = linear_probe(*args, n_classes=10, backend="sklearn", tol=1e-6)
    # At every strength up to 1 that both tried, the two solvers agree on the validation split to one
    # image (at weak regularisation the optimum is flat: one image may flip, and with it the chosen
    # strength; far stronger, the logits are near-ties and argmax is noise).
    theirs = dict(ref["search"])
    common = [(lam, acc, theirs[lam]) for lam, acc in ours["search"] if lam in theirs and lam <= 1]
    assert len(common) >= 7 and all(abs(a - b) <= 0.5 for _, a, b in common), common
    assert abs(ours["accuracy"] - ref["accuracy"]) <= 1.0, (ours["accuracy"], ref["accuracy"])
    assert ours["accuracy"] > 70


def test_retrieval_recall():
    t = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    out = retrieval(t.numpy(), t)
    assert out["image_to_text_R@1"] == 100.0 and out["text_to_image_R@1"] == 100.0
    assert retrieval(t.numpy(), t.roll(1, 0))["image_to_text_R@1"] == 0.0


def test_missing_set_and_class_list_errors(tmp_path):
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        open_eval_set("cifar10", tmp_path)
    with pytest.raises(DatasetError, match="imagenet"):
        open_eval_set("imagenet", tmp_path)
    with pytest.raises(DatasetError, match="no class list"):
        load_class_names("no-such-set")
    (tmp_path / "country211" / "test" / "AD").mkdir(parents=True)   # 1 class folder, list has 211
    (tmp_path / "country211" / "test" / "AD" / "x.png").write_bytes(b"")
    for s in ("train", "valid"):
        (tmp_path / "country211" / s / "AD").mkdir(parents=True)
        (tmp_path / "country211" / s / "AD" / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="211"):
        open_eval_set("country211", tmp_path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from model.checkpoint import save_export, to_open_clip_state_dict
    from model.clip import build_model
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = build_model("tiny")
    save_export(model, None, d / "export")
    torch.save(to_open_clip_state_dict(model.state_dict()), d / "open_clip.pt")
    torch.save(to_open_clip_state_dict(build_model("tiny", vision_cfg={"layers": 3}).state_dict()), d / "wrong.pt")
    return d


def test_end_to_end_export_and_open_clip_same_results(checkpoints, tmp_path, capsys):
    common = ["--datasets", "digits", "--max-per-split", "400", "--fewshot-episodes", "50", "--workers", "0",
              "--cache-dir", str(tmp_path / "cache")]
    assert E.main(["--checkpoint", str(checkpoints / "export"), "--out", str(tmp_path / "a.json")] + common) == 0
    assert E.main(["--checkpoint", str(checkpoints / "open_clip.pt"), "--model", "tiny",
                   "--out", str(tmp_path / "b.json")] + common) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["checkpoint"]["sha256"] != b["checkpoint"]["sha256"]          # different files ...
    for proto in ("zeroshot", "fewshot", "linear_probe"):                   # ... same weights
        assert a["results"]["digits"][proto]["accuracy"] == pytest.approx(
            b["results"]["digits"][proto]["accuracy"], abs=1e-4)
    assert "| Digits | Average |" in a["table"]
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 4              # 2 checkpoints x 2 splits
    E.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert "Zero-shot delta" in capsys.readouterr().out


def test_wrong_architecture_names_keys(checkpoints, tmp_path, capsys):
    assert E.main(["--checkpoint", str(checkpoints / "wrong.pt"), "--model", "tiny", "--datasets", "digits",
                   "--out", str(tmp_path / "x.json"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: ") and "visual.transformer.resblocks.2" in err


def test_probe_solvers_agree():
    """scipy's L-BFGS-B (CPU) and torch's L-BFGS (the GPU path, run here on CPU) reach the same optimum."""
    from evaluation.probe import LogReg
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(300, 12)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 4, 300))
    fits = [LogReg(x, y, 4, solver=s).fit(1e-2, tol=1e-6) for s in ("scipy", "torch")]
    for a, b in zip(*fits):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="solver"):
        LogReg(x, y, 4, solver="newton")
