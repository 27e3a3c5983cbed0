"""The compiled tokenizer against the reference CLIP tokenizer, id for id.

The reference is open_clip's `SimpleTokenizer` (OpenAI CLIP's pure-Python BPE), imported from open_clip as
installed in .venv.
"""
import numpy as np
import pytest
import torch

from model.tokenizer import CONTEXT_LENGTH, get_tokenizer
from benchmarks.corpus import varied_captions


@pytest.fixture(scope="module")
def reference():
    return pytest.importorskip("open_clip.tokenizer").SimpleTokenizer()


def test_vocabulary_and_special_tokens(reference):
    tok = get_tokenizer()
    assert tok.vocab_size == 49408 == reference.vocab_size
    assert (tok.sot_token_id, tok.eot_token_id) == (reference.sot_token_id, reference.eot_token_id)


def test_matches_reference_on_10k_varied_captions(reference):
    captions = varied_captions(12_000)
    ours = get_tokenizer()(captions)
    theirs = reference(captions)
    mismatched = [c for c, a, b in zip(captions, ours, theirs) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} captions differ, e.g. {mismatched[:3]!r}"
    # The corpus really is varied: long captions are cut, many texts are non-ASCII.
    assert (ours[:, -1] == reference.eot_token_id).sum() > 5
    assert sum(not c.isascii() for c in captions) > 1000


def test_batch_order_and_mixed_batches_do_not_change_ids(reference):
    captions = varied_captions(500, seed=1)
    tok = get_tokenizer()
    one_by_one = [tok.encode([c])[0] for c in captions]
    batched = tok.encode(captions)
    assert all(np.array_equal(a, b) for a, b in zip(one_by_one, batched))


def test_encode_cuts_to_context_and_keeps_end_token():
    tok = get_tokenizer()
    ids = tok.encode(["word " * 200, ""])
    assert ids[0].dtype == np.uint16 and len(ids[0]) == CONTEXT_LENGTH - 2
    assert len(ids[1]) == 0
    padded = tok(["word " * 200, ""])
    assert padded.shape == (2, CONTEXT_LENGTH) and padded.dtype == torch.long
    assert padded[0, -1] == tok.eot_token_id and padded[1, :3].tolist() == [tok.sot_token_id, tok.eot_token_id, 0]


def test_decode_round_trips_plain_text():
    tok = get_tokenizer()
    assert tok.decode(tok(["A photo of a café, 3 dogs!"])[0].tolist()) == "a photo of a café , 3 dogs !"
    with pytest.raises(TypeError):
        tok.encode("not a list")
