#!/usr/bin/env bash
# Create or refresh .venv, install medtl3d with its test extra, run the test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MEDTL3D_EXTRAS=test
source scripts/_venv.sh
# One intra-op thread (unless set): the tests' tensors are small, and with 2 CPUs shared with anything else two
# OpenMP threads spin-wait for each other (a MobileNetV2 training step measured 6x slower than with one thread).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
# Parallelism comes from test processes instead (pytest-xdist): one per CPU, at most 4 (each holds its own torch);
# MEDTL3D_TEST_WORKERS overrides, and an explicit -n/--numprocesses among the arguments wins.
workers="${MEDTL3D_TEST_WORKERS:-$(.venv/bin/python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}"
case " $* " in *" -n "*|*" -n"[0-9]*|*" --numprocesses"*) parallel=() ;; *) parallel=(-n "$workers") ;; esac
exec .venv/bin/python -m pytest -q "${parallel[@]}" "$@"
