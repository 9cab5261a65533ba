#!/usr/bin/env bash
# Create or refresh .venv, install medtl3d with its test extra, run the test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MEDTL3D_EXTRAS=test
source scripts/_venv.sh
# One intra-op thread (unless set): the tests' tensors are small, and with 2 CPUs shared with anything else two
# OpenMP threads spin-wait for each other (a MobileNetV2 training step measured 6x slower than with one thread).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q "$@"
