"""Reads W&B offline run files back: `python -m tests.wandb_offline_log WANDB_DIR` prints, as JSON, each
offline run under WANDB_DIR, oldest first: [run id, {step: logged values}].

A run-<id>.wandb file is W&B's LevelDB-style log (a 7-byte file header, 32 KiB blocks of chunks with a
7-byte header: crc32, length, type full/first/middle/last) of protobuf Records. wandb 0.31 ships the
Record type but no Python reader (wandb-core writes these files).

The tests run this in a fresh interpreter, not inside pytest: importing wandb builds pydantic models that
ast.parse their own source, and once in a fresh-clone CI run that parse, inside the pytest process that had
run some 300 tests before, raised CPython 3.11's "SystemError: AST constructor recursion depth mismatch"
(a check on the ast module's interpreter-wide recursion counter; see python/cpython#106905). A fresh
process has nothing left over from earlier tests.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, LAST = 1, 4


def read_run(path: Path) -> tuple[str | None, dict[int, dict]]:
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, chunk, run_id, history = path.read_bytes(), HEADER, b"", None, {}
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            which = record.WhichOneof("record_type")
            if which == "run":
                run_id = record.run.run_id
            elif which == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                history[row["_step"]] = row
    return run_id, history


def read_runs(wandb_dir: Path) -> list[tuple[str | None, dict[int, dict]]]:
    return [read_run(path) for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))]


if __name__ == "__main__":
    print(json.dumps(read_runs(Path(sys.argv[1]))))
