#!/usr/bin/env bash
# The main job: create or refresh .venv, install medtl3d, then the hierarchical cutoff search of the
# ctpa_pe_classification bundle on phantom CTPA with an ImageNet MobileNetV2 inflated to 3D: probes per cut point,
# FTL and truncation (TTL) at every block cut point, then the layers around the best; report in outputs/demo/
# (extra args go to scripts/demo.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
exec .venv/bin/python scripts/demo.py "$@"
