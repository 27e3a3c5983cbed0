#!/usr/bin/env bash
# The main job on the embedded default data. Stages land here as they are built; each one is re-runnable
# and reuses finished work.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p results/demo
echo "== caption store on real offline captions (openclipart metadata + emoji names)"
$PY -m benchmarks store --out results/demo/store.json
