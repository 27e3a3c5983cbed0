"""Remote and streamed data (common/io.py, common/remote_copy.py) against a real HTTP server on 127.0.0.1
(Python's http.server in a thread, serving a tmp folder), fsspec's memory:// and file:// stores and
`pipe:cat`: tar shards stream into the packer and the rewrite reader; packs and eval sets are copied once
into a local cache, keyed by URL and content, and re-used.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from common.io import RemoteError, expand_shards, open_input
from tests.conftest import REPO, serve_folder


@pytest.fixture
def serve():
    """serve(folder) -> base URL of a real HTTP server on 127.0.0.1 (conftest.serve_folder);
    `serve.requests` lists the paths of the last one's GET requests; stopped at the end of the test."""
    servers = []

    def start(folder) -> str:
        servers.append(serve_folder(folder))
        start.requests = servers[-1].requests
        return servers[-1].url
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LACLIP_REMOTE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_shards(folder: Path, source: dict, per_shard: int) -> list[Path]:
    """img2dataset-style tars (<key>.jpg + <key>.txt) of an emoji image folder's rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, tars = source["rows"], []
    for n, start in enumerate(range(0, len(rows), per_shard)):
        tars.append(folder / f"{n:05d}.tar")
        with tarfile.open(tars[-1], "w") as tar:
            for row in rows[start:start + per_shard]:
                for name, data in ((f"{row['key']}.jpg", Path(source["folder"], row["file"]).read_bytes()),
                                   (f"{row['key']}.txt", row["caption"].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return tars


def no_template(i, row):
    return None


@pytest.fixture
def shards(emoji_source, tmp_path) -> dict:
    source = emoji_source(24, no_template, image_size=48)
    tars = write_shards(tmp_path / "site" / "shards", source, per_shard=10)
    return {"source": source, "site": tmp_path / "site", "tars": tars}


def samples(spec) -> list[tuple[str, str, bytes]]:
    from packing.ingest import IngestReport, iter_webdataset
    return [(s.key, s.caption, s.image) for s in iter_webdataset(spec, IngestReport())]


def test_tar_shards_stream_from_http_memory_file_and_pipe(shards, serve):
    import fsspec
    local = samples([str(t) for t in shards["tars"]])
    assert len(local) == len(shards["source"]["rows"]) > 20
    base = serve(shards["site"])
    urls = expand_shards(base + "/shards/{00000..00002}.tar")
    assert urls == [f"{base}/shards/{i:05d}.tar" for i in range(3)]
    assert samples(base + "/shards/{00000..00002}.tar") == local
    memory = fsspec.filesystem("memory")
    for t in shards["tars"]:
        memory.pipe_file(f"/remote-test/{t.name}", t.read_bytes())
    assert expand_shards("memory://remote-test/*.tar") == [f"memory:///remote-test/{t.name}" for t in shards["tars"]]
    assert samples("memory://remote-test/*.tar") == local
    assert samples("file://" + str(shards["site"] / "shards") + "/{00000..00002}.tar") == local
    assert samples("pipe:cat " + str(shards["site"] / "shards") + "/{00000..00002}.tar") == local
    from rewrite.inputs import read_captions  # the rewrite side reads the same shards' captions
    assert read_captions(base + "/shards/{00000..00002}.tar") == [(k, c) for k, c, _ in local]


def test_unreadable_urls_are_one_remote_error_naming_them(shards, serve, tmp_path):
    base = serve(shards["site"])
    cases = {base + "/shards/nope.tar": "not found",
             "http://127.0.0.1:1/a.tar": "cannot read it (ClientConnectorError: Cannot connect to host 127.0.0.1:1",
             "pipe:cat " + str(tmp_path / "missing.tar"): "the command exited with status 1 (cat: "}
    for url, fragment in cases.items():
        with pytest.raises(RemoteError) as err:
            samples(url)
        assert str(err.value).startswith(url + ": ") and fragment in str(err.value), str(err.value)
        assert "\n" not in str(err.value)


@pytest.mark.skipif(__import__("importlib").util.find_spec("s3fs") is not None, reason="s3fs is installed here")
def test_missing_fsspec_backend_names_the_package():
    with pytest.raises(RemoteError, match=r"^s3://bucket/a.tar: reading s3:// needs the s3fs package "
                                          r"\(pip install s3fs\)$"):
        with open_input("s3://bucket/a.tar"):
            pass


def test_pack_copy_is_made_once_keyed_by_content_and_redone_when_half_written(make_pack, emoji_source, cache,
                                                                              serve, tmp_path):
    """A pack served over HTTP: copied file by file from its meta.json (the server's listing is never
    asked for), checked, reused without a download by a second call and by threads racing for it, a new
    copy when the pack changes; a killed download's folder is removed by the next download."""
    import shutil

    from common.remote_copy import local_copy
    from loaders.packed import verify_pack
    source = emoji_source(24, no_template, image_size=48)
    pack_dir = Path(make_pack(input=source["folder"], max_side=32, samples_per_shard=10, workers=1)["out"])
    site = tmp_path / "site"
    shutil.copytree(pack_dir, site / "pack")
    base = serve(site)
    url = base + "/pack"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(local_copy(url))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and results[0].parent.parent == cache and results[0].name == "pack"
    copy = results[0]
    meta = verify_pack(str(copy), checksums=True)  # every file, re-hashed
    assert meta == json.loads((pack_dir / "meta.json").read_text())
    listed = {rel for s in meta["shards"] for rel in s["files"]} | set(meta["files"]) | {"meta.json"}
    fetched = [p for p in serve.requests if not p.endswith("/meta.json")]
    assert sorted(fetched) == sorted(f"/pack/{rel}" for rel in listed if rel != "meta.json")  # once each
    serve.requests.clear()
    assert local_copy(url) == copy and serve.requests == ["/pack/meta.json"]  # a re-run: one small request

    # a changed pack is a new copy; a killed download of it left a half-written temporary folder
    changed = json.loads((site / "pack" / "meta.json").read_text())
    changed["source"]["note"] = "repacked"
    (site / "pack" / "meta.json").write_text(json.dumps(changed))
    url_hash = copy.parent.name.split("-")[0]
    content_hash = hashlib.sha256((site / "pack" / "meta.json").read_bytes()).hexdigest()[:12]
    leftover = cache / f".{url_hash}-{content_hash}.killed.tmp"
    (leftover / "pack" / "dali").mkdir(parents=True)
    (leftover / "pack" / "dali" / "part-00000.tar").write_bytes(b"half")
    second = local_copy(url)
    assert second != copy and second.is_dir() and copy.is_dir() and not leftover.exists()
    assert json.loads((second / "meta.json").read_text())["source"]["note"] == "repacked"
    verify_pack(str(second), checksums=True)


def test_eval_root_and_caption_file_from_urls(cache, serve, tmp_path):
    """--data-root as a URL (an MNIST-layout folder, read through the server's listing) and a caption file
    URL for the rewrite reader: copied once, then read as local files; a 404 is the DatasetError line."""
    import numpy as np

    from evaluation.datasets import DatasetError, open_eval_set
    from rewrite.inputs import read_captions
    mnist = tmp_path / "site" / "eval" / "mnist"
    mnist.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 8)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (mnist / f"{prefix}-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + np.array(
            [n, 28, 28], ">i4").tobytes() + images.tobytes())
        (mnist / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + np.array(
            [n], ">i4").tobytes() + (np.arange(n) % 10).astype(np.uint8).tobytes())
    (tmp_path / "site" / "captions.txt").write_text("a red square\na blue circle\n")
    base = serve(tmp_path / "site")
    local = open_eval_set("mnist", tmp_path / "site" / "eval")
    remote = open_eval_set("mnist", base + "/eval")
    assert Path(remote.source).is_relative_to(cache)
    for split in ("train", "test"):
        assert np.array_equal(remote.splits[split].arrays, local.splits[split].arrays)
        assert np.array_equal(remote.splits[split].labels, local.splits[split].labels)
    assert read_captions(base + "/captions.txt") == [("000000000", "a red square"), ("000000001", "a blue circle")]
    with pytest.raises(DatasetError, match=f"^{base}/nothing: "):
        open_eval_set("captions:" + base + "/nothing", "data")


def test_folder_copy_from_memory_store_is_keyed_by_names_and_sizes(cache):
    """A folder in fsspec's memory store (listed with sizes, as object stores are): copied with its
    sub-folders, reused while unchanged, a new copy when a file changes size."""
    import fsspec

    from common.remote_copy import local_copy
    memory = fsspec.filesystem("memory")
    memory.pipe_file("/evalroot/folderset/test/cat/0.txt", b"meow")
    memory.pipe_file("/evalroot/folderset/test/dog/0.txt", b"woof")
    first = local_copy("memory://evalroot/folderset/")
    assert first.name == "folderset" and first.parent.parent == cache
    assert {str(p.relative_to(first)): p.read_bytes() for p in first.rglob("*.txt")} == \
        {"test/cat/0.txt": b"meow", "test/dog/0.txt": b"woof"}
    assert local_copy("memory://evalroot/folderset") == first
    memory.pipe_file("/evalroot/folderset/test/dog/0.txt", b"woof woof")
    second = local_copy("memory://evalroot/folderset")
    assert second != first and (second / "test" / "dog" / "0.txt").read_bytes() == b"woof woof"


# ----------------------------------------------------------------------------- the whole path over HTTP

def _run(argv: list[str], env: dict, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pack_train_eval_from_http_on_127_0_0_1(shards, serve, tmp_path):
    """python -m packing from tar shards served over HTTP (a brace list of URLs); train.py 3 steps from
    that pack served over HTTP as data_root; eval.py on an eval set served over HTTP. The pack equals the
    one made from the same local tars; the run reads the cached copy; config.yaml keeps the URL."""
    site = shards["site"]
    base = serve(site)
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "LACLIP_REMOTE_CACHE": str(tmp_path / "cache")}
    common = ["--max-side", "32", "--workers", "1"]
    _run(["-m", "packing", "--input", base + "/shards/{00000..00002}.tar", "--out", str(site / "pack"), *common], env)
    _run(["-m", "packing", "--input", str(site / "shards"), "--out", str(tmp_path / "local_pack"), *common], env)
    remote_meta = json.loads((site / "pack" / "meta.json").read_text())
    local_meta = json.loads((tmp_path / "local_pack" / "meta.json").read_text())
    assert remote_meta["num_samples"] == local_meta["num_samples"] == len(shards["source"]["rows"])
    assert [s["files"] for s in remote_meta["shards"]] == [s["files"] for s in local_meta["shards"]]

    run_dir = tmp_path / "run"
    sets = ["progress=false", "data=torch", f"data_root={base}/pack", "num_workers=0", "micro_batch=8",
            "total_steps=3", "checkpoint_every=0", f"run_dir={run_dir}"]
    out = _run(["train.py", "--config", "configs/train_tiny.yaml", *[a for s in sets for a in ("--set", s)]], env)
    assert f"remote: copied {base}/pack" in out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert f"data_root: {base}/pack" in (run_dir / "config.yaml").read_text()

    export = next(run_dir.glob("checkpoints/step-*/export"))
    eval_set = "captions:" + base + "/emoji"
    os.symlink(shards["source"]["folder"], site / "emoji")
    _run(["eval.py", "--checkpoint", str(export), "--datasets", eval_set, "--protocols", "zeroshot,retrieval",
          "--workers", "0", "--cache-dir", "", "--out", str(tmp_path / "results.json")], env)
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert results["captions:emoji"]["n_test"] >= 1 and "top1" in results["captions:emoji"]["zeroshot"]
