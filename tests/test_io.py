"""common/io.py: atomic writes leave the old file or the new one and no temporary file; JSONL errors name
the file and the line in the caller's error type."""
import json
import os
import stat

import pytest

from common.io import (atomic_open, atomic_path, expand_shards, is_temp, read_jsonl, temp_path, write_atomic,
                       write_json_atomic, write_with)


def test_write_atomic_text_bytes_json_and_mode(tmp_path):
    write_atomic(tmp_path / "a" / "b.txt", "café")                     # missing folders are made
    assert (tmp_path / "a" / "b.txt").read_text(encoding="utf-8") == "café"
    write_atomic(str(tmp_path / "c.bin"), b"\x00\x01", sync_dir=True)
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    write_json_atomic(tmp_path / "d.json", {"k": [1, 2]}, indent=1, newline=True)
    assert (tmp_path / "d.json").read_text().endswith("\n") and json.loads((tmp_path / "d.json").read_text())
    write_with(tmp_path / "e.txt", lambda p: open(p, "w").write("via name"))
    assert (tmp_path / "e.txt").read_text() == "via name"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "c.bin").stat().st_mode) == 0o666 & ~umask   # not mkstemp's 0600
    assert sorted(os.listdir(tmp_path)) == ["a", "c.bin", "d.json", "e.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "x.json"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        open(tmp, "w").write("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["x.json"]
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["x.json"]


def test_atomic_open_writes_utf8_text_and_every_temp_name_is_recognised(tmp_path):
    with atomic_open(tmp_path / "a.txt") as f:
        f.write("café")
        seen = os.listdir(tmp_path)
    assert len(seen) == 1 and is_temp(seen[0])                             # the write in progress
    assert (tmp_path / "a.txt").read_bytes() == "café".encode("utf-8") and os.listdir(tmp_path) == ["a.txt"]
    streamed = temp_path(tmp_path / "shard.lcs")                             # a streaming writer's file
    assert is_temp(streamed) and os.path.dirname(streamed) == str(tmp_path)
    assert not any(is_temp(n) for n in ("a.txt", ".hidden", "x.tmp", ".git"))


class Custom(ValueError):
    pass


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (3, {"b": 2})]     # blank lines skipped, numbers kept
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(Custom, match=r"rows\.jsonl:2: invalid JSON"):
        list(read_jsonl(path, Custom))
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: expected a JSON object"):
        list(read_jsonl(path))
    path.write_bytes(b'{"a": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:1: not UTF-8 text"):
        list(read_jsonl(path))


def test_expand_shards_errors_in_the_callers_type(tmp_path):
    for i in range(2):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    assert expand_shards(str(tmp_path / "{00000..00001}.tar")) == [str(tmp_path / "00000.tar"),
                                                                     str(tmp_path / "00001.tar")]
    with pytest.raises(Custom, match="1 of 3 shards do not exist"):
        expand_shards(str(tmp_path / "{00000..00002}.tar"), Custom)
