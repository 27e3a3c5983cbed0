#!/usr/bin/env bash
# The main job on the embedded default data (README's first command, `make demo`): build the data, rewrite,
# pack, train CLIP, three LaCLIPs, LaCLIP-MT and EDA with deepspeed on CPU, evaluate, write results/demo/report.md.
# Every stage is re-runnable and reuses finished work; arguments go to scripts/demo.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
exec $PY scripts/demo.py "$@"
