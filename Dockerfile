# syntax=docker/dockerfile:1
#
# xaiserve image: gRPC gateway (`xaiserve serve`, the default command) and job worker
# (`xaiserve worker`, same image, other command). See docs/DEPLOY.md.
#
#   CPU (default):  docker build -t xaiserve:0.1.0 .
#   CUDA:           docker build --build-arg FLAVOR=cuda -t xaiserve:0.1.0-cuda .
#
# The CUDA flavour installs a CUDA build of torch and onnxruntime-gpu; both bring the CUDA runtime
# and cuDNN as pip wheels (nvidia-*), so the base image stays the same slim Python and only the
# host's NVIDIA driver (NVIDIA container toolkit / device plugin) is needed at run time. The build
# fails when either package is not the CUDA one. At run time `--device auto` (the default) puts
# the torch work on the GPU, and nvidia-ml-py (a core dependency) exports the GPU metrics.
# Note: the PyTorch wheel index (download.pytorch.org) is not reachable from the machines that
# develop this project; the build needs it. The Dockerfile is linted with hadolint in CI
# (tests/test_dockerfile.py) because no Docker engine runs there.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# cpu | cuda
ARG FLAVOR=cpu
ARG TORCH_VERSION=2.13.0
# onnxruntime-gpu of the CUDA image; the CPU image takes onnxruntime from the project's dependencies.
ARG ONNXRUNTIME_VERSION=1.31.1

# ------------------------------------------------------------------------------ build stage
FROM ${PYTHON_IMAGE} AS builder
ARG FLAVOR
ARG TORCH_VERSION
ARG ONNXRUNTIME_VERSION
# The CUDA variant of the PyTorch index published for TORCH_VERSION (cu126, cu128, cu130, ...).
ARG TORCH_CUDA=cu130
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index of the flavour (PyPI's default torch wheel is the multi-GB CUDA one).
RUN case "${FLAVOR}" in \
        cpu) torch_index="https://download.pytorch.org/whl/cpu" ;; \
        cuda) torch_index="https://download.pytorch.org/whl/${TORCH_CUDA}" ;; \
        *) echo "FLAVOR must be cpu or cuda, not '${FLAVOR}'" >&2; exit 1 ;; \
    esac \
 && pip install --no-cache-dir --index-url "${torch_index}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY xaiserve ./xaiserve
# torch is already in the venv (the pinned CPU or CUDA build), so pip keeps it. The serving core
# plus the [spiral] extra (numba: the spiral denoiser's compiled runtime); no training extras. In
# the CUDA image onnxruntime-gpu provides the `onnxruntime` module; the CPU wheel that the
# project's dependency list pulls in would shadow it, so it is removed again.
RUN pip install --no-cache-dir "./[spiral]" \
 && pip install --no-cache-dir --no-deps "onnx2torch==1.5.15" \
 && if [ "${FLAVOR}" = "cuda" ]; then \
        pip uninstall -y onnxruntime \
        && pip install --no-cache-dir --force-reinstall --no-deps "onnxruntime-gpu==${ONNXRUNTIME_VERSION}"; \
    fi \
 && python -c "import os, torch, onnxruntime, pynvml, grpc_health.v1, xaiserve.service.security; \
assert os.environ['FLAVOR'] != 'cuda' or torch.version.cuda, 'FLAVOR=cuda needs a CUDA build of torch'; \
assert os.environ['FLAVOR'] != 'cuda' or 'CUDAExecutionProvider' in onnxruntime.get_available_providers(), 'no onnxruntime-gpu'; \
print(torch.__version__, torch.version.cuda, onnxruntime.get_available_providers())"

# ------------------------------------------------------------------------------ runtime stage
FROM ${PYTHON_IMAGE} AS runtime
ARG FLAVOR
LABEL org.opencontainers.image.title="xaiserve" \
      org.opencontainers.image.description="gRPC service for image-model explanations (NEM-U, NEMt, RELAX, ablation paths) and a spiral-CNN cryo-EM denoiser" \
      ai.xaiserve.flavor="${FLAVOR}"

# A fixed, non-root uid/gid (Kubernetes runAsNonRoot checks a numeric user).
RUN groupadd --system --gid 10001 xaiserve \
 && useradd --system --uid 10001 --gid xaiserve --home-dir /app --shell /usr/sbin/nologin xaiserve \
 && mkdir -p /var/lib/xaiserve \
 && chown xaiserve:xaiserve /var/lib/xaiserve

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# The default models, read-only for the service user; a volume can replace it (model_store setting).
COPY --chown=root:root model_store /app/model_store
COPY --chown=root:root deploy/docker/healthcheck.py /app/healthcheck.py

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XAISERVE_HOST=0.0.0.0 \
    XAISERVE_PORT=50051 \
    XAISERVE_METRICS_HOST=0.0.0.0 \
    XAISERVE_METRICS_PORT=9100 \
    XAISERVE_MODEL_STORE=/app/model_store \
    XAISERVE_STATE_DIR=/var/lib/xaiserve \
    XAISERVE_LOG_JSON=true \
    XAISERVE_PROCESSES=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib

USER 10001:10001
# gRPC, Prometheus metrics, and the plaintext grpc.health.v1 port used when gRPC is TLS-only.
# State (the embedded SQLite queue) lives in /var/lib/xaiserve: mount a volume there; with a
# read-only root file system also mount a writable /tmp (caches of torch and matplotlib).
EXPOSE 50051 9100 50052

# grpc.health.v1 check of the gateway (plain health port when XAISERVE_HEALTH_PORT is set).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]

ENTRYPOINT ["xaiserve"]
CMD ["serve"]
