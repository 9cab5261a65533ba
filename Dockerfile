# medtl3d on a CUDA PyTorch runtime: the library, its `medtl3d` console script and the four MONAI bundles.
#
#   docker build -t medtl3d .
#   docker run --rm medtl3d                      # medtl3d --help
#   docker run --gpus all --rm -v "$PWD/outputs:/opt/medtl3d/bundles/ctpa_pe_classification/outputs" medtl3d \
#       python -m monai.bundle run --config_file bundles/ctpa_pe_classification/configs/train.yaml
#   docker run --gpus all --rm -v /data/ctpa:/data:ro -v "$PWD/outputs:/outputs" medtl3d \
#       python -m monai.bundle run --config_file bundles/ctpa_pe_classification/configs/train.yaml \
#       --dataset_dir /data --output_dir /outputs --ckpt_path /outputs/models/model.pt
#
# Bundles are found from the working directory (/opt/medtl3d); every config id can be overridden on the command
# line (see bundles/<name>/docs/README.md). Another base: --build-arg BASE_IMAGE=pytorch/pytorch:<tag>.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="medtl3d" \
      org.opencontainers.image.description="3D-capable medical-imaging transfer learning on MONAI bundles" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/medtl3d

# the package first (its dependencies are the slow layer), then the bundles and scripts, which change more often
COPY pyproject.toml setup.cfg README.md ./
COPY medtl3d ./medtl3d
RUN pip install --no-cache-dir . \
    && python -c "import medtl3d, monai, torch; print('medtl3d', medtl3d.__version__, 'torch', torch.__version__)"

COPY bundles ./bundles
COPY scripts ./scripts

CMD ["medtl3d", "--help"]
