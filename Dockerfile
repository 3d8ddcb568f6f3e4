# syntax=docker/dockerfile:1
#
# slimserve image. CPU by default:
#
#   docker build -t slimserve:0.1.0 .
#   docker run --rm -p 8000:8000 -v "$PWD/model_repository:/models" slimserve:0.1.0
#
# GPU (CUDA + cuDNN runtime base, the `gpu` extra: onnxruntime-gpu, tensorrt, nvidia-ml-py;
# torch from the matching CUDA wheel index). onnxruntime-gpu 1.31 is built for CUDA 13 and
# cuDNN 9 (its CUDA provider links libcudart.so.13 / libcublas.so.13; checked on an H100 with
# driver 580), so the base and torch are CUDA 13 too:
#
#   docker build -t slimserve:0.1.0-gpu \
#     --build-arg BASE_IMAGE=nvcr.io/nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04 \
#     --build-arg RUNTIME_EXTRA=gpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
#   docker run --rm --gpus all -p 8000:8000 -v "$PWD/model_repository:/models" slimserve:0.1.0-gpu
#
# Settings are SLIMSERVE_* environment variables (serving/settings.py); the image sets
# SLIMSERVE_HOST=0.0.0.0, SLIMSERVE_PORT=8000, SLIMSERVE_REPOSITORY=/models. The model
# repository is a volume (the demo models are baked in as its default content); upload jobs
# write to /var/lib/slimserve/jobs. The container runs as uid 10001 and works with a
# read-only root filesystem as long as /tmp is writable.

ARG BASE_IMAGE=python:3.11.11-slim-bookworm

# ---- base: a Python >= 3.11 with venv (CUDA bases ship without one) -----------------------
FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The distribution's python3 on CUDA bases (Ubuntu 24.04: 3.12); a no-op on python:* images.
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c "import sys; assert sys.version_info >= (3, 11), sys.version"

# ---- builder: a virtualenv with pinned wheels (no compilers needed or kept) ------------------
FROM base AS builder
ARG RUNTIME_EXTRA=cpu
# torch is installed first, pinned, from the PyTorch CPU wheel index: an unpinned torch from
# PyPI resolves to a CUDA build (several GB of nvidia-* wheels) the CPU image does not need.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG ORT_VERSION=1.31.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv \
    && pip install "pip==25.3" "setuptools==80.9.0" "wheel==0.45.1"
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serving/ serving/
COPY optimizers/ optimizers/
# The project plus its runtime dependencies at the versions the test suite ran with
# (DL3013: the local project ".[extra]" and "${ort}" are pinned, hadolint cannot see it).
# hadolint ignore=DL3013
RUN case "${RUNTIME_EXTRA}" in \
      cpu) ort="onnxruntime==${ORT_VERSION}" ;; \
      gpu) ort="onnxruntime-gpu==${ORT_VERSION}" ;; \
      *) echo "RUNTIME_EXTRA must be cpu or gpu, got '${RUNTIME_EXTRA}'" >&2; exit 1 ;; \
    esac \
    && pip install ".[${RUNTIME_EXTRA}]" "${ort}" \
      "numpy==2.4.6" "onnx==1.23.2" "protobuf==6.33.6" "tritonclient[http,grpc]==2.73.0" \
      "fastapi==0.165.0" "starlette==1.10.0" "uvicorn[standard]==0.54.0" "orjson==3.13.0" \
      "python-multipart==0.0.34" "prometheus-client==0.26.0" "pydantic==2.14.3" \
      "pydantic-settings==2.16.3" "typer==0.29.2" "rich==15.0.0" "psutil==7.2.2" \
      "scipy==1.17.1" "matplotlib==3.11.2" "safetensors==0.8.0" "transformers==5.23.0" \
      "onnxscript==0.7.2" "onnxconverter-common==1.16.0" "scikit-learn==1.9.1" \
    && python -c "import onnxruntime, serving.app; print(onnxruntime.get_available_providers())"

# ---- runtime: the virtualenv, the demo repository, an unprivileged user ----------------------
FROM base AS runtime
ARG RUNTIME_EXTRA=cpu
LABEL org.opencontainers.image.title="slimserve" \
      org.opencontainers.image.description="KServe v2 / Triton-compatible server for compressed models" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.slimserve.runtime="${RUNTIME_EXTRA}"
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/slimserve \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    SLIMSERVE_HOST=0.0.0.0 \
    SLIMSERVE_PORT=8000 \
    SLIMSERVE_REPOSITORY=/models \
    SLIMSERVE_JOBS_DIR=/var/lib/slimserve/jobs \
    MALLOC_MMAP_THRESHOLD_=1048576 \
    MALLOC_ARENA_MAX=2
# glibc: a fixed mmap threshold hands unloaded models' memory back to the OS (load/unload
# cycles stay flat instead of growing with the adaptive threshold; see tests/e2e/test_faults.py)
RUN groupadd --system --gid 10001 slimserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/slimserve \
      --no-create-home --shell /usr/sbin/nologin slimserve \
    && mkdir -p /models /var/lib/slimserve/jobs \
    && chown -R 10001:10001 /models /var/lib/slimserve
COPY --from=builder /opt/venv /opt/venv
COPY --chown=10001:10001 model_repository/ /models/
WORKDIR /var/lib/slimserve
USER 10001:10001
VOLUME ["/models", "/var/lib/slimserve/jobs"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SLIMSERVE_PORT', '8000') + '/v2/health/ready', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["slimserve"]
CMD ["serve"]
