"""Fault injection on the data side: flipped bytes, truncation, kill -9 during pack, bad inputs.

Every case reproduces a failure that once hung, crashed with a raw traceback or silently gave wrong data;
each must now end in one clear error naming the file and record (or a counted skip), never a hang.
"""
import numpy as np

from benchmarks.corpus import varied_captions
from model.tokenizer import ClipTokenizer, get_tokenizer


def test_tokenizer_word_cache_filling_mid_batch_keeps_every_word():
    """A 50-word cache is cleared inside most batches: ids must still equal the uncached tokenizer's."""
    small = ClipTokenizer(cache_words=50)
    captions = varied_captions(300, seed=2)
    want = get_tokenizer().encode(captions)
    for start in range(0, len(captions), 7):
        got = small.encode(captions[start:start + 7])
        assert all(np.array_equal(a, b) for a, b in zip(got, want[start:start + 7]))
    assert small._words.num_words <= 50 + 7 * 80  # it was cleared, not grown without bound
