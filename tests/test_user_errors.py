"""The README's promise across every CLI: a user's mistake is one line on stderr and exit status 2, no
traceback. Each row is a real command line run in a subprocess on tiny real inputs made here, and a
fragment its one line must hold. Rows that could leave an output behind also check that it is gone.

One row launches 2 ranks with DeepSpeed's launcher: a corrupt record met mid-run must stop every rank
with the PackError's line (naming tar, sample and key), not with torch's distributed traceback.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, serve_folder

TRAIN = ["train.py", "--config", "configs/train_tiny.yaml", "--set", "progress=false", "--set", "stop_after=2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Paths the rows name: an image folder (not a pack), its pack, a copy of the pack with one caption
    record damaged, an export, empty caption files, an empty step-* folder, a run_dir holding a run; `url`: a
    real HTTP server on 127.0.0.1 serving the root folder."""
    from PIL import Image
    from packing.pack import PackConfig, pack
    from model.checkpoint import save_export
    from model.clip import build_model

    root = tmp_path_factory.mktemp("user_errors")
    folder = root / "images"
    folder.mkdir()
    rows = []
    for i in range(24):  # distinct real JPEGs: a colour ramp per sample
        Image.new("RGB", (40, 32), (10 * i, 255 - 10 * i, 7 * i % 256)).save(folder / f"{i}.jpg")
        rows.append({"key": f"s{i:02d}", "file": f"{i}.jpg", "caption": f"a flat colour number {i}"})
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    packed = root / "packed"
    pack(PackConfig(input=str(folder), out=str(packed), max_side=32, samples_per_shard=12, workers=1))

    damaged = root / "damaged"
    shutil.copytree(packed, damaged)
    # the caption record of shard 0's sample 2: its offset and size from the webdataset index
    line = (packed / "dali" / "part-00000.idx").read_text().splitlines()[1 + 2].split()
    offset, size = int(line[line.index("cap") + 1]), int(line[line.index("cap") + 2])
    tar = damaged / "dali" / "part-00000.tar"
    data = bytearray(tar.read_bytes())
    data[offset + size // 2] ^= 0xFF
    tar.write_bytes(bytes(data))

    save_export(build_model("tiny"), None, root / "export")
    (root / "empty_folder").mkdir()
    (root / "empty_folder" / "captions.jsonl").write_text("")
    (root / "empty.txt").write_text("")
    (root / "ckpt" / "step-0000003").mkdir(parents=True)
    (root / "used_run").mkdir()
    (root / "used_run" / "config.yaml").write_text("data: synthetic\n")
    key = (packed / "keys.txt").read_text().split()[2]
    server = serve_folder(root)  # for the remote rows
    yield {"root": root, "folder": folder, "packed": packed, "damaged": damaged, "key": key, "url": server.url}
    server.shutdown()
    server.server_close()


# (id, command, the fragment of the one line, what must not exist afterwards, extra environment)
ROWS = [
    # train.py
    ("train-no-data", ["train.py", "--set", "run_dir={out}"],
     "config key 'data' from the defaults: required: data=torch|ffcv|dali with data_root", "{out}", {}),
    ("train-data-root-not-a-pack", TRAIN + ["--set", "data=torch", "--set", "data_root={folder}", "--set",
                                            "run_dir={out}"],
     "data_root {folder}: not a packed dataset ({folder}/meta.json: missing", "{out}/config.yaml", {}),
    ("train-resume-empty-step-folder", TRAIN + ["--set", "run_dir={out}", "--resume", "{root}/ckpt/step-0000003"],
     "holds no DeepSpeed checkpoint (no *model_states.pt file", "{out}/config.yaml", {}),
    ("train-existing-run-dir", TRAIN + ["--set", "run_dir={root}/used_run"],
     "{root}/used_run already holds a run (config.yaml); continue it with --resume latest", None, {}),
    ("train-unknown-eval-set", TRAIN + ["--set", "run_dir={out}", "--set", "eval_every=1", "--set",
                                        "eval_datasets=digits,nosuch"],
     "config key 'eval_datasets' from --set: unknown dataset 'nosuch'; known: ", "{out}", {}),
    ("train-missing-eval-set", TRAIN + ["--set", "run_dir={out}", "--set", "eval_every=1", "--set",
                                        "eval_datasets=mnist", "--set", "eval_data_root={root}/nothing"],
     "eval_datasets: mnist: expected the idx file", "{out}/config.yaml", {}),
    ("train-no-rank", TRAIN + ["--set", "run_dir={out}"], "$WORLD_SIZE=2 but no $RANK", "{out}",
     {"WORLD_SIZE": "2"}),
    # eval.py
    ("eval-unknown-set", ["eval.py", "--checkpoint", "{root}/export", "--datasets", "nosuch", "--out", "{out}"],
     "eval.py: error: unknown dataset 'nosuch'; known: ", "{out}", {}),
    ("eval-missing-set", ["eval.py", "--checkpoint", "{root}/export", "--datasets", "mnist", "--data-root",
                          "{root}/nothing", "--out", "{out}"],
     "eval.py: error: mnist: expected the idx file", "{out}", {}),
    ("eval-no-rank", ["eval.py", "--checkpoint", "{root}/export", "--datasets", "digits", "--out", "{out}"],
     "eval.py: error: $WORLD_SIZE=2 but no $RANK", "{out}", {"WORLD_SIZE": "2"}),
    ("eval-compare-missing-file", ["eval.py", "--compare", "{root}/a.json", "{root}/b.json"],
     "eval.py: error: {root}/a.json: cannot read it (No such file or directory)", None, {}),
    ("eval-compare-not-a-result", ["eval.py", "--compare", "{folder}/captions.jsonl", "{folder}/captions.jsonl"],
     "eval.py: error: {folder}/captions.jsonl: not JSON", None, {}),
    ("eval-no-checkpoint", ["eval.py", "--datasets", "digits"], "eval.py: error: --checkpoint is required", None, {}),
    # CLIP_benchmark's names whose data is missing, or only comes through tensorflow_datasets; --recall_k
    ("eval-vtab-needs-tfds", ["eval.py", "--checkpoint", "{root}/export", "--datasets", "vtab/svhn", "--out", "{out}"],
     "eval.py: error: vtab/svhn: CLIP_benchmark reads it with tensorflow_datasets", "{out}", {}),
    ("eval-missing-imagenetv2", ["eval.py", "--checkpoint", "{root}/export", "--datasets", "imagenetv2",
                                 "--data-root", "{root}", "--out", "{out}"],
     "eval.py: error: imagenetv2: expected ImageNetV2-matched-frequency/<class index 0..999>/*.jpeg", "{out}", {}),
    ("eval-missing-wds", ["eval.py", "--checkpoint", "{root}/export", "--datasets", "wds/vtab/cifar10",
                          "--data-root", "{root}", "--out", "{out}"],
     "eval.py: error: wds/vtab/cifar10: expected CLIP_benchmark's webdataset layout", "{out}", {}),
    ("eval-bad-recall-k", ["eval.py", "--checkpoint", "{root}/export", "--recall_k", "5", "0", "--out", "{out}"],
     "eval.py: error: config key 'recall_k' from --recall_k: [5, 0] must be one or more integers >= 1", "{out}", {}),
    # python -m packing
    ("pack-missing-jsonl", ["-m", "packing", "--input", "{root}/missing.jsonl", "--out", "{out}"],
     "pack: error: {root}/missing.jsonl: no such file", "{out}", {}),
    # remote inputs ({url}: a real HTTP server on 127.0.0.1 serving {root}; port 1: nothing listens)
    ("pack-http-404", ["-m", "packing", "--input", "{url}/shards/{{000..003}}.tar", "--out", "{out}"],
     "pack: error: {url}/shards/000.tar: not found", "{out}", {}),
    ("pack-http-unreachable", ["-m", "packing", "--input", "http://127.0.0.1:1/shards/{{000..003}}.tar", "--out",
                               "{out}"],
     "http://127.0.0.1:1/shards/000.tar: cannot read it (ClientConnectorError: Cannot connect to host", "{out}", {}),
    ("pack-pipe-fails", ["-m", "packing", "--input", "pipe:cat {root}/missing.tar", "--out", "{out}"],
     "pack: error: pipe:cat {root}/missing.tar: the command exited with status 1 (cat: ", "{out}", {}),
    ("pack-s3-without-s3fs", ["-m", "packing", "--input", "s3://bucket/shards/{{0..1}}.tar", "--out", "{out}"],
     "s3://bucket/shards/0.tar: reading s3:// needs the s3fs package (pip install s3fs)", "{out}", {}),
    ("pack-remote-captions-file", ["-m", "packing", "--input", "{url}/images/captions.jsonl", "--out", "{out}"],
     "remote inputs are tar shards", "{out}", {}),
    ("train-data-root-http-404", TRAIN + ["--set", "data=torch", "--set", "data_root={url}/nopack", "--set",
                                          "run_dir={out}"],
     "train: error: data_root {url}/nopack: not found", "{out}/config.yaml", {}),
    ("train-data-root-pipe", TRAIN + ["--set", "data=torch", "--set", "data_root=pipe:cat x.tar", "--set",
                                      "run_dir={out}"],
     "data_root pipe:cat x.tar: a pipe: command streams tar shards only", "{out}/config.yaml", {}),
    ("eval-data-root-unreachable", ["eval.py", "--checkpoint", "{root}/export", "--datasets", "mnist", "--data-root",
                                    "http://127.0.0.1:1/eval", "--out", "{out}"],
     "eval.py: error: http://127.0.0.1:1/eval: cannot read it (ClientConnectorError", "{out}", {}),
    ("pack-unknown-builder", ["-m", "packing", "--input", "opnclipart", "--out", "{out}"],
     "opnclipart: no such file or folder, and not a builder name (did you mean 'openclipart'? builders: emoji, "
     "openclipart)", "{out}", {}),
    ("pack-missing-shards", ["-m", "packing", "--input", "{root}/shards/{{0..2}}.tar", "--out", "{out}"],
     "3 of 3 shards do not exist", "{out}", {}),
    ("pack-empty-captions", ["-m", "packing", "--input", "{root}/empty_folder", "--out", "{out}"],
     "{root}/empty_folder/captions.jsonl: empty file (no captions)", "{out}", {}),
    ("pack-broken-tar", ["-m", "packing", "--input", "{folder}/captions.jsonl.tar", "--out", "{out}"],
     "no usable samples", "{out}", {}),
    # python -m rewrite
    ("rewrite-empty-captions", ["-m", "rewrite", "--engine", "eda", "--input", "{root}/empty.txt", "--out", "{out}",
                                "--no-progress"],
     "rewrite: error: {root}/empty.txt: no captions (an empty file)", "{out}", {}),
    ("rewrite-http-404", ["-m", "rewrite", "--engine", "eda", "--input", "{url}/c.txt", "--out", "{out}"],
     "rewrite: error: {url}/c.txt: not found", "{out}", {}),
    # python -m benchmarks
    ("benchmarks-corpus-is-no-benchmark", ["-m", "benchmarks", "corpus"],
     "unknown benchmark 'corpus'; available: all, eval, gpu, loader, pack, rewrite, store, train", None, {}),
]


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **extra}


@pytest.mark.parametrize("name, command, fragment, gone, env", ROWS, ids=[r[0] for r in ROWS])
def test_user_error_is_one_line_and_exit_2(inputs, tmp_path, name, command, fragment, gone, env):
    if name == "pack-broken-tar":  # a file named .tar that is not a tar
        (inputs["folder"] / "captions.jsonl.tar").write_bytes(b"not a tar archive\n" * 40)
    if name == "pack-s3-without-s3fs" and importlib.util.find_spec("s3fs"):
        pytest.skip("s3fs is installed here")
    paths = {k: v for k, v in inputs.items() if isinstance(v, (Path, str))} | {"out": tmp_path / "out"}
    argv = [part.format(**paths) for part in command]
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=_env(env), capture_output=True, text=True,
                          timeout=180)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    if name in ("pack-broken-tar", "pack-pipe-fails"):  # read once staging has started: its progress bar went first
        lines = lines[-1:]
    assert len(lines) == 1, proc.stderr
    assert fragment.format(**paths) in lines[0], lines[0]
    assert lines[0].split(":")[1].strip() == "error", lines[0]  # "<program>: error: ..."
    if gone:
        assert not Path(gone.format(**paths)).exists()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_corrupt_record_mid_run_stops_every_rank_with_its_one_line(inputs, tmp_path):
    """2 ranks, torch loader with a worker: one rank reads the damaged record at its first batches; every
    rank exits 2 (the launcher reports the exit status of the first rank it sees end) and the only error
    line is the PackError's, naming tar, sample and key."""
    from common.ranks import free_port
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
               *TRAIN, "--set", "stop_after=6", "--set", "micro_batch=4", "--set", "checkpoint_every=0",
               "--set", "data=torch", "--set", f"data_root={inputs['damaged']}", "--set", "num_workers=1",
               "--set", f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(command, cwd=REPO, env=_env({}), capture_output=True, text=True, timeout=360)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train: error:")]
    tar = inputs["damaged"] / "dali" / "part-00000.tar"
    assert len(errors) == 1 and f"{tar}: sample 2 (key {inputs['key']}): caption record does not decode" \
        in errors[0], out[-4000:]
    # rank 0 went through the agreed stop (its status line), whichever rank met the record
    assert "train: stopped by a data error (rank " in proc.stdout, out[-4000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "end: stopped by a data error" in log
