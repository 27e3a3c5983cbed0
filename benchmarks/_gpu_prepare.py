"""`python -m benchmarks gpu --prepare DIR`: what the GPU acceptance check needs, made on a CPU machine.

DIR/emoji/     real emoji images with their names (packing.builders), a held-out split: the eval set
DIR/pack/      the training split packed by packing.pack: train.py's data on the GPU node
DIR/cpu_export the export of the CPU run of the check's own train.py procedure (N/2 steps, checkpoint,
               --resume latest to N), and DIR/manifest.json: that run's losses, eval.py's zero-shot result on
               its export (CPU), and the wheel list
DIR/wheels.txt the packages (name==version, as installed here) that train.py and eval.py imported in those
               CPU runs (traced with python -X importtime), minus what a GPU node brings (torch and its
               dependencies, numpy, numba); with --wheels their wheels for CPython 3.12 / Linux x86_64
               in DIR/wheels/ (DeepSpeed is built here: PyPI has only its source) and their size.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu_runs import eval_top1, run_eval, train_resume

# on a GPU node already (the premise: Python 3.12, torch with CUDA, numba)
NODE_HAS = {"torch", "numpy", "numba", "llvmlite", "triton", "filelock", "fsspec", "jinja2", "markupsafe",
            "networkx", "sympy", "mpmath", "typing-extensions", "setuptools", "pip"}
WHEEL_BUDGET_MIB = 64


def prepare(out: Path, train_steps: int, samples: int, wheels: bool) -> dict:
    from packing import builders
    from packing.pack import PackConfig, pack
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    emoji = Path(builders.build_dataset("emoji", str(out / "emoji"), max_samples=samples, image_size=56,
                                        heldout_fraction=0.3))
    pack(PackConfig(input=str(emoji), out=str(out / "pack"), max_side=48, quality=90, workers=2))
    run_dir = out / "cpu_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    trace = out / "imports.txt"
    trained = train_resume(out, run_dir, train_steps, trace=trace)
    export = out / "cpu_export"
    shutil.rmtree(export, ignore_errors=True)
    export.mkdir()
    shutil.copytree(trained["export"], export, dirs_exist_ok=True)  # one weights file and its configs
    shutil.rmtree(run_dir)  # DeepSpeed's optimizer files: megabytes the GPU node does not need
    result = run_eval(export, emoji, out / "cpu_eval.json", trace=trace)
    packages = imported_packages(trace.read_text())
    (out / "wheels.txt").write_text("".join(f"{n}=={v}\n" for n, v in packages.items()))
    manifest = {"format_version": 1, "train_steps": train_steps, "samples": samples,
                "cpu": {"losses": trained["losses"], "eval_top1": eval_top1(result), "torch": _version("torch")},
                "wheels": packages, "prepare_seconds": round(time.perf_counter() - start, 1)}
    if wheels:
        manifest["wheelhouse"] = download_wheels(packages, out / "wheels")
    from common.io import write_json_atomic
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def imported_packages(importtime_log: str) -> dict[str, str]:
    """{distribution: version} of the third-party modules a `python -X importtime` log shows imported."""
    tops = {m.group(1).split(".")[0] for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)",
                                                            importtime_log, re.M)}
    by_module = md.packages_distributions()
    found = {}
    for top in sorted(tops):
        for dist in by_module.get(top, []):
            name = re.sub(r"[-_.]+", "-", dist).lower()
            if name in NODE_HAS or name.startswith("nvidia-") or name == "laclip":
                continue
            found[name] = md.version(dist)
    return dict(sorted(found.items()))


def download_wheels(packages: dict[str, str], dest: Path) -> dict:
    """Wheels for CPython 3.12 / Linux x86_64, no dependencies (the list is the whole closure); a source
    only package (DeepSpeed) is built into a wheel here."""
    dest.mkdir(parents=True, exist_ok=True)
    platform = ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
                "--platform", "manylinux_2_17_x86_64", "--platform", "linux_x86_64"]
    missing = []
    for name, version in packages.items():
        spec = f"{name}=={version}"
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              "--python-version", "3.12", "--implementation", "cp", *platform, "-d", str(dest),
                              spec], capture_output=True, text=True)
        if got.returncode != 0:  # no wheel on the index: build one (pure Python, like DeepSpeed without ops)
            got = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                                  "--no-build-isolation", "-w", str(dest), spec], capture_output=True, text=True)
        if got.returncode != 0:
            missing.append(f"{spec}: {got.stderr.strip().splitlines()[-1:] or got.returncode}")
    mib = sum(p.stat().st_size for p in dest.glob("*.whl")) / 2 ** 20
    return {"wheels": sorted(p.name for p in dest.glob("*.whl")), "mib": round(mib, 1),
            "fits_budget": mib <= WHEEL_BUDGET_MIB, "budget_mib": WHEEL_BUDGET_MIB, "missing": missing}


def main(out: str, train_steps: int, samples: int, wheels: bool) -> dict:
    manifest = prepare(Path(out), train_steps, samples, wheels)
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) / 2 ** 20
    print(f"gpu: prepared {out} ({size:.1f} MiB; CPU zero-shot top-1 {manifest['cpu']['eval_top1']:.2f}, "
          f"{len(manifest['wheels'])} packages to bring"
          + (f", wheels {manifest['wheelhouse']['mib']} MiB" if wheels else "") + ")")
    print(json.dumps(manifest, indent=1))
    return manifest
