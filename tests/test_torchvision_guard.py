"""scripts/torchvision_guard.py as scripts/setup.sh installs it in .venv: torchvision (so open_clip and the
clip_benchmark command) imports whether or not its C++ ops load, the guard touches only
torchvision._meta_registrations and only without the ops, and a Python start imports no torch for it."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

from tests.conftest import REPO


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_installed_in_the_environment_from_the_repository_source():
    installed = importlib.util.find_spec("laclip_torchvision_guard")
    assert installed is not None, "scripts/setup.sh has not installed the guard in this environment"
    assert open(installed.origin).read() == (REPO / "scripts" / "torchvision_guard.py").read_text(), \
        "the installed guard differs from scripts/torchvision_guard.py: re-run scripts/setup.sh"


def test_python_start_loads_the_finder_without_torch():
    out = _python("import sys; print('torch' in sys.modules, [type(f).__name__ for f in sys.meta_path][:1])")
    assert out == "False ['TorchvisionOpsGuard']"


def test_open_clip_and_clip_benchmark_import_with_or_without_torchvision_ops():
    out = _python("import open_clip, clip_benchmark.cli, torchvision, sys; "
                  "m = sys.modules['torchvision._meta_registrations']; "
                  "print(torchvision.extension._has_ops(), hasattr(m, 'register_meta'))")
    has_ops, real_module = out.split()
    # without the ops (the CPU torch here) the guard's empty module; with them torchvision's own
    assert real_module == has_ops


def test_steps_aside_for_other_modules_and_when_the_ops_loaded(monkeypatch):
    import torchvision.extension as extension
    from laclip_torchvision_guard import TorchvisionOpsGuard as guard
    assert guard.find_spec("torchvision.ops") is None
    monkeypatch.setattr(extension, "_has_ops", lambda: True)      # as on a node whose torchvision matches torch
    assert guard.find_spec("torchvision._meta_registrations") is None
    monkeypatch.setattr(extension, "_has_ops", lambda: False)
    assert guard.find_spec("torchvision._meta_registrations").name == "torchvision._meta_registrations"
