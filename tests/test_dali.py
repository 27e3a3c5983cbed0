"""DALI loader: same seed gives bit-identical batches, a resumed epoch continues exactly, damaged samples
give an error naming the tar, sample and key (never a hang). Uses conftest's packed emoji set."""
import os
import shutil

import pytest
import torch

from packing.pack import PackError
from tests.test_loaders import cat, run


@pytest.mark.slow  # DALI pipelines for three runs: 12 s on 2 cores with its set-up
def test_same_seed_gives_bit_identical_batches_for_any_worker_count(packed):
    one = run("dali", packed, epoch=4, num_workers=1, drop_last=False)
    two = run("dali", packed, epoch=4, num_workers=2, drop_last=False)
    for key in ("images", "tokens", "index"):
        assert torch.equal(cat(one, key), cat(two, key)), key
    other_epoch = run("dali", packed, epoch=5, num_workers=1, drop_last=False)
    assert not torch.equal(cat(one, "images"), cat(other_epoch, "images"))  # crops change per epoch


@pytest.mark.slow  # 10.3 s on 2 cores: two DALI runs of an epoch with SLIP views
def test_resumed_epoch_continues_with_the_same_crops_and_texts(packed):
    full = run("dali", packed, epoch=2, batch_size=8, slip_views=True)
    tail = run("dali", packed, epoch=2, batch_size=8, slip_views=True, start_batch=6)
    assert len(tail) == len(full) - 6
    for a, b in zip(full[6:], tail):
        for key in ("images", "tokens", "index", "view1", "view2"):
            assert torch.equal(a[key], b[key]), key


def _flip_byte(root, member, sample=7):
    """Flip one byte of sample `sample`'s member in the first DALI tar (jpg: in the header; cap: mid-record)."""
    with open(os.path.join(root, "dali/part-00000.idx")) as f:
        parts = f.read().splitlines()[1 + sample].split()
    at = parts.index(member)
    offset, size = int(parts[at + 1]), int(parts[at + 2])
    pos = offset + (2 if member == "jpg" else size // 2)
    with open(os.path.join(root, "dali/part-00000.tar"), "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0xFF]))
    return parts[3].rsplit(".", 1)[0]


@pytest.mark.timeout(120)
# the JPEG case measured 7.6 s on 2 cores, the caption case 4 s (7.6 s when it runs first: the first DALI
# pipeline of the process pays for DALI's start)
@pytest.mark.parametrize("member,what", [pytest.param("jpg", "JPEG", marks=pytest.mark.slow),
                                         ("cap", "caption record")])
def test_flipped_byte_names_the_tar_sample_and_key(member, what, packed, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    key = _flip_byte(copy, member)
    with pytest.raises(PackError, match=rf"part-00000\.tar: {what} of sample 7 \(key '{key}'\)"):
        run("dali", str(copy), drop_last=False)


@pytest.mark.timeout(120)
def test_jpeg_flip_that_still_decodes_is_caught_by_the_record_checksums(packed, tmp_path):
    """A flip inside the entropy-coded data decodes to a wrong image without error: only the CRC-32s
    written at pack time (check_records=True, compared inside the compiled op) see it."""
    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    with open(os.path.join(copy, "dali/part-00000.idx")) as f:
        parts = f.read().splitlines()[1 + 5].split()
    offset, size = int(parts[1]), int(parts[2])
    with open(os.path.join(copy, "dali/part-00000.tar"), "r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)[0]
        f.seek(offset + size // 2)
        f.write(bytes([byte ^ 0x01]))
    assert len(run("dali", str(copy), drop_last=False)) == 6  # unchecked: a silently different image
    with pytest.raises(PackError, match=r"part-00000\.tar: sample 5 \(key '.*'\): JPEG checksum mismatch"):
        run("dali", str(copy), drop_last=False, check_records=True)
