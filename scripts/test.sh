#!/usr/bin/env bash
# Create or refresh .venv, install medtl3d with its test extra, run the test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MEDTL3D_EXTRAS=test
source scripts/_venv.sh
exec .venv/bin/python -m pytest -q "$@"
