# The API server and dashboard, and the one-shot `init` / `migrate` roles: CPU-only torch, no CUDA.
# Build from the repository root (docker-compose.yml does this):
#   docker build -f docker/server.Dockerfile -t mmmo-server:0.1.0 .
# Needs Docker Engine >= 23 (BuildKit: COPY --chmod, the per-Dockerfile .dockerignore beside this file).
ARG PYTHON_VERSION=3.11.13
ARG DEBIAN_RELEASE=bookworm

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PSYCOPG_VERSION=3.3.9
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/mmmo/bin:$PATH
RUN python -m venv /opt/mmmo \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
# The dependencies from pyproject.toml (a layer that survives code changes), then the package alone.
COPY pyproject.toml README.md /src/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "psycopg[binary]==${PSYCOPG_VERSION}"
COPY service /src/service
COPY search /src/search
COPY merging /src/merging
COPY evals /src/evals
RUN pip install --no-deps /src \
    && python -c "import torch; assert not torch.version.cuda, 'the server image wants a CPU torch'"

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}
ARG MMMO_UID=10001
ARG MMMO_VERSION=0.1.0
LABEL org.opencontainers.image.title="mmmo-server" \
      org.opencontainers.image.description="mmmo API server and dashboard (CPU)" \
      org.opencontainers.image.version="${MMMO_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# One fixed uid in both images, so the volumes they share (worker token, caches) agree on ownership.
RUN groupadd --system --gid "${MMMO_UID}" mmmo \
    && useradd --system --uid "${MMMO_UID}" --gid mmmo --home-dir /home/mmmo --create-home \
        --shell /usr/sbin/nologin mmmo \
    && mkdir -p /var/lib/mmmo/tokens /var/lib/mmmo/gpu-locks /var/lib/mmmo/artifacts \
        /var/cache/mmmo /var/cache/huggingface /models \
    && chown -R mmmo:mmmo /var/lib/mmmo /var/cache/mmmo /var/cache/huggingface
COPY --from=build /opt/mmmo /opt/mmmo
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/mmmo-entrypoint
# `mmmo serve` reads MMMO_HOST and MMMO_PORT itself; in a container it listens on every address.
ENV PATH=/opt/mmmo/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MMMO_HOME=/var/lib/mmmo \
    MMMO_CACHE_DIR=/var/cache/mmmo \
    MMMO_HOST=0.0.0.0 \
    MMMO_PORT=8765 \
    HF_HOME=/var/cache/huggingface
USER ${MMMO_UID}:${MMMO_UID}
WORKDIR /home/mmmo
EXPOSE 8765
HEALTHCHECK --interval=15s --timeout=6s --start-period=60s --retries=3 CMD ["mmmo-entrypoint", "healthcheck"]
ENTRYPOINT ["mmmo-entrypoint"]
CMD ["server"]
