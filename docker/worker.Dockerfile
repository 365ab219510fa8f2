# A GPU worker: CUDA torch and lm-eval; leases trials from the API over HTTP(S).
# Build from the repository root (docker-compose.yml does this):
#   docker build -f docker/worker.Dockerfile -t mmmo-worker:0.1.0 .
# The CUDA runtime comes with the torch wheel (PyPI's Linux x86_64 torch is a CUDA build); the host
# needs only the NVIDIA driver and the NVIDIA Container Toolkit. For another CUDA build pass e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# Needs Docker Engine >= 23 (BuildKit: COPY --chmod, the per-Dockerfile .dockerignore beside this file).
ARG PYTHON_VERSION=3.11.13
ARG DEBIAN_RELEASE=bookworm

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG PSYCOPG_VERSION=3.3.9
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/mmmo/bin:$PATH
RUN python -m venv /opt/mmmo \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && python -c "import torch; assert torch.version.cuda, 'the worker image wants a CUDA torch'"
# The dependencies from pyproject.toml (a layer that survives code changes), then the package alone.
COPY pyproject.toml README.md /src/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "psycopg[binary]==${PSYCOPG_VERSION}"
COPY service /src/service
COPY search /src/search
COPY merging /src/merging
COPY evals /src/evals
RUN pip install --no-deps /src

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}
ARG MMMO_UID=10001
ARG MMMO_VERSION=0.1.0
LABEL org.opencontainers.image.title="mmmo-worker" \
      org.opencontainers.image.description="mmmo GPU worker (CUDA torch, lm-eval)" \
      org.opencontainers.image.version="${MMMO_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# A C/C++ compiler: torch.compile builds the fused merge kernels with it (Triton's launcher on a GPU,
# vectorised C++ on a CPU); without one, merges run the same kernels eagerly, slower. Not pinned to
# package versions: the base image's tag pins the Debian release, whose security updates replace them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# One fixed uid in both images, so the volumes they share (worker token, caches) agree on ownership.
RUN groupadd --system --gid "${MMMO_UID}" mmmo \
    && useradd --system --uid "${MMMO_UID}" --gid mmmo --home-dir /home/mmmo --create-home \
        --shell /usr/sbin/nologin mmmo \
    && mkdir -p /var/lib/mmmo/tokens /var/lib/mmmo/gpu-locks /var/lib/mmmo/artifacts \
        /var/cache/mmmo /var/cache/huggingface /models \
    && chown -R mmmo:mmmo /var/lib/mmmo /var/cache/mmmo /var/cache/huggingface
COPY --from=build /opt/mmmo /opt/mmmo
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/mmmo-entrypoint
# MMMO_DEVICE=auto: `mmmo worker` takes the first GPU torch sees, else the CPU (and the entrypoint
# claims one free GPU per container when MMMO_GPU_LOCK_DIR is set).
# NVIDIA_VISIBLE_DEVICES is left to the runtime (compose's GPU reservation, the Kubernetes device
# plugin): set here it would hand every GPU to containers that asked for none.
ENV PATH=/opt/mmmo/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MMMO_HOME=/var/lib/mmmo \
    MMMO_CACHE_DIR=/var/cache/mmmo \
    MMMO_DEVICE=auto \
    HF_HOME=/var/cache/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/mmmo/torchinductor \
    TRITON_CACHE_DIR=/var/cache/mmmo/triton \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CUDA_DEVICE_ORDER=PCI_BUS_ID
USER ${MMMO_UID}:${MMMO_UID}
WORKDIR /home/mmmo
ENTRYPOINT ["mmmo-entrypoint"]
CMD ["worker"]
