#!/usr/bin/env bash
# The main job: create or refresh .venv, install medtl3d, then `medtl3d study` on the cxr_classification bundle's
# phantom chest X-rays with ImageNet MobileNetV2: transfer vs random init, truncated transfer at two block cuts with
# their random-init controls, 5 folds; claims with intervals and verdicts in outputs/demo/ (extra args go to
# scripts/demo.py, e.g. --stats, --seeds 2; see its docstring for why the demo task is 2D).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
exec .venv/bin/python scripts/demo.py "$@"
