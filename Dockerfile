# matrix-media-relay container image.
#
#   podman build --format docker -t matrix-media-relay .      (or: docker build -t … .)
#   mkdir relay-data && sudo chown 1337:1337 relay-data       (the image runs as 1337:1337)
#   docker run --rm -v ./relay-data:/data matrix-media-relay  (first run: writes the config)
# The README's "Docker" section has the whole sequence (registration hand-over included).
#
# Build arguments:
#   BASE           base image with python3 >= 3.11 and its venv module (default below).
#   PIP_INDEX_URL  package index for the build stage (default: PyPI).
# Build secret (optional): a CA bundle for builds behind a TLS-intercepting proxy,
#   --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt
# The runtime stage installs from the wheels built in the first stage and never
# touches the network.
ARG BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: wheels
FROM ${BASE} AS build
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
# A venv, not the system pip: Debian-based images refuse system-wide pip use (PEP 668).
# `pip wheel` builds the project and fetches every dependency as a wheel into /wheels.
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
    && python3 -m venv /opt/build \
    && /opt/build/bin/pip wheel --index-url "$PIP_INDEX_URL" --wheel-dir /wheels .

# ---------------------------------------------------------------- runtime
FROM ${BASE}
# The internal listener must be reachable from the homeserver's container, so it binds
# all interfaces here: this variable overrides appservice.hostname in the config (which
# says 127.0.0.1). Publish its port (29340) on a private network only, never on the
# internet.
ENV PATH=/opt/media-relay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RELAY_APPSERVICE_HOSTNAME=0.0.0.0
# Only the runtime dependencies: no `test`/`demo` extras (they would pull in Synapse).
# uid/gid 1337 like the mautrix bridges, so one chown fits every bridge's data dir.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python3 -m venv /opt/media-relay \
    && /opt/media-relay/bin/pip install --no-cache-dir --no-index --find-links /wheels \
        matrix-media-relay \
    && media-relay --version \
    && groupadd --gid 1337 relay \
    && useradd --uid 1337 --gid relay --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin relay \
    && mkdir -p /data \
    && chown relay:relay /data

USER relay
WORKDIR /data
VOLUME /data
# 29340: internal listener (homeserver and bridges; private network only).
# 29341: public listener (signed media links; put a TLS reverse proxy in front).
EXPOSE 29340 29341

# The public listener's health endpoint. If public.port is changed, change it through
# RELAY_PUBLIC_PORT so this check follows; no proxy is used for the loopback request.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/_relay/health' % os.environ.get('RELAY_PUBLIC_PORT', '29341'), timeout=4)"]

# First start with an empty /data: writes /data/config.yaml from the example and exits 6
# (edit it); next start: fills its secrets, writes /data/registration.yaml and exits 6
# (give it to the homeserver); after that the relay runs.
ENTRYPOINT ["media-relay"]
CMD ["run", "--config", "/data/config.yaml", "--create-missing", \
     "--registration", "/data/registration.yaml"]
