# The playrec image: the `playrec` console script (stream worker, training, retraining) with the
# RocksDB table store. Used by every playrec service in docker-compose.yml; see docs/DEPLOYMENT.md.
#
#   docker build -t playrec .
#   docker run --rm playrec --help
#
# No secrets are baked in: Kafka credentials and certificates come from the environment and from
# mounts at run time.

# -- build: install the project and its dependencies into a virtual environment -----------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/playrec

WORKDIR /src
# Dependencies change less often than the code: resolve them from pyproject.toml first.
COPY pyproject.toml README.md ./
COPY playrec ./playrec
COPY batch ./batch
COPY index ./index
COPY stream ./stream
RUN /opt/playrec/bin/pip install ".[rocksdb]" \
    && /opt/playrec/bin/playrec --help >/dev/null

# -- runtime ------------------------------------------------------------------------------------
FROM python:3.11-slim

LABEL org.opencontainers.image.title="playrec" \
      org.opencontainers.image.description="Streaming music recommender: implicit ALS, exact fold-in on Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed, unprivileged uid/gid, so that volumes and bind mounts can be prepared for it on the host.
# /models (the model store) and /var/lib/playrec (a worker's local table state) are created owned by
# it: Docker copies that ownership into a named volume the first time the volume is mounted there.
RUN groupadd --system --gid 10001 playrec \
    && useradd --system --uid 10001 --gid playrec --create-home --home-dir /home/playrec \
        --shell /usr/sbin/nologin playrec \
    && mkdir -p /models /var/lib/playrec \
    && chown playrec:playrec /models /var/lib/playrec

COPY --from=build /opt/playrec /opt/playrec

ENV PATH=/opt/playrec/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PLAYREC_STORE=/models \
    PLAYREC_DATA_DIR=/var/lib/playrec

USER playrec:playrec
WORKDIR /var/lib/playrec

# the stream worker's HTTP API
EXPOSE 6066

ENTRYPOINT ["playrec"]
CMD ["--help"]
