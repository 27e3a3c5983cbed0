"""End to end: scripts/demo.py --quick on a few dozen real samples (build, rewrite live + EDA, pack,
six deepspeed training runs with 2 ranks on CPU, eval.py, report), then a re-run that reuses every stage."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.demo_config import METHODS, DemoConfig
from tests.conftest import REPO

DEMO_METHODS = DemoConfig().methods
METHOD_ROWS = tuple(label for label, *_ in METHODS.values())


def _demo(out: Path, data: Path, shipped: Path, *preset: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "scripts/demo.py", *preset, "--quick", "--out", str(out), "--set", f"data_cache={data}",
           "--set", f"shipped_rewrites={shipped}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc


def _table_rows(report: str) -> dict[str, dict[str, str]]:
    """The results table (the report's first): method -> {column header: cell}."""
    rows, header = {}, None
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "Method":
            header = cells[1:]
        elif header and not line.strip():
            break
        elif header and cells[0] in METHOD_ROWS:
            rows[cells[0]] = dict(zip(header, cells[1:]))
    return rows


@pytest.mark.slow
def test_demo_quick_runs_end_to_end_and_reuses_finished_stages(tmp_path):
    out, data, shipped = tmp_path / "demo", tmp_path / "data", tmp_path / "shipped"
    if (REPO / "data" / "rewrites").is_dir():  # a snapshot: `make rewrites` may be adding shards meanwhile
        shutil.copytree(REPO / "data" / "rewrites", shipped)
    first = _demo(out, data, shipped)

    report = (out / "report.md").read_text()
    rows = _table_rows(report)
    assert set(rows) == {METHODS[m][0] for m in DEMO_METHODS}, report
    for method, cells in rows.items():
        # 2 zero-shot + 4 retrieval + 3 Fashion-MNIST columns, + 2 retrieval columns per set with other
        # wording: the clip art always has keywords; a few dozen emoji may hold too few aliases ('-')
        assert len(cells) == 13, (method, cells)
        for head, cell in cells.items():  # every metric is a real number in percent (bold marks the best)
            if cell == "-" and head.startswith("Emoji other words"):
                continue
            value = float(re.match(r"\**([0-9.]+)", cell).group(1))
            assert 0.0 <= value <= 100.0, (method, head, cell)
    assert "## Does LaCLIP beat CLIP here?" in report and "LaCLIP − CLIP =" in report
    assert "| LaCLIP, human alt texts | " in report and "**Fidelity filter**" in report
    assert "samples/s" in report and "captions/s" in report
    assert (out / "curves.png").stat().st_size > 10_000
    for method in DEMO_METHODS:
        run = out / "runs" / f"{method}-seed0"
        assert (run / "checkpoints" / "step-0000006" / "export" / "open_clip_model.safetensors").is_file()
        assert len(list((out / "eval" / f"{method}-seed0").glob("heldout-step-*.json"))) == 2  # steps 3, 6
    assert "| CLIP |" in first.stdout  # the table is printed at the end

    # a re-run reuses every finished stage: nothing is trained or evaluated again
    logs = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/launcher.log")}
    second = _demo(out, data, shipped)
    reused = re.findall(r"\[([\w-]+)\] finished earlier", second.stdout)
    assert {"data", "rewrite", "pack-llm", "pack-llm_filtered", "pack-human", "pack-eda", "loader",
            "train-clip-seed0", "train-eda-seed0", "eval-laclip_mt-seed0"} <= set(reused), second.stdout[-3000:]
    assert "done in" not in second.stdout.split("== [6/6]")[0]
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/launcher.log")} == logs
    assert _table_rows((out / "report.md").read_text()) == rows


@pytest.mark.slow
def test_experiment_preset_states_its_design_and_runs_end_to_end(tmp_path):
    """--preset experiment --help states the pre-registration; its quick form runs every stage on a few
    dozen clip-art images with 2 seeds and reports the primary test, its fixed-wording verdict, the Holm
    table and each arm's measured share of original captions."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    help_text = subprocess.run([sys.executable, "scripts/demo.py", "--preset", "experiment", "--help"], cwd=REPO,
                               env=env, capture_output=True, text=True, timeout=120).stdout
    for part in ("HYPOTHESIS", "PRIMARY", "ARMS", "SEEDS", "ANALYSIS", "sign-flip", "Holm", "80% power"):
        assert part in help_text, part
    out = tmp_path / "exp"
    _demo(out, tmp_path / "data", REPO / "data" / "rewrites" / "embedded", "--preset", "experiment")
    report = (out / "report.md").read_text()
    assert re.search(r"\*\*Verdict: (significant gain|significant loss|inconclusive)\.\*\*", report), report
    assert "n = 2 seeds; paired t-test p = " in report and "exact sign-flip p = " in report
    assert "detectable with 80% power" in report and "| Holm p |" in report
    shares = dict(re.findall(r"\| (LaCLIP[^|]*) \|[^\n]*\| ([0-9.]+)% \| [0-9.]+ \|", report))
    assert set(shares) == {"LaCLIP", "LaCLIP, 1 rewrite"}, report
    assert "| CLIP |" in report and "100.00% |" in report
    assert (out / "curves.png").stat().st_size > 10_000
