#!/usr/bin/env bash
# The main job: create or refresh .venv, install medtl3d, generate the phantom CTPA dataset, run the
# ctpa_pe_classification bundle for full fine-tuning (FTL) and truncation (TTL) at every block cut point of an
# ImageNet MobileNetV2 inflated to 3D, and write the per-cutoff report to outputs/demo/ (extra args go to demo.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
exec .venv/bin/python scripts/demo.py "$@"
