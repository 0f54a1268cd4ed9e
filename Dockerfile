# syntax=docker/dockerfile:1
# The base defaults to the official Python image; any Debian bookworm root file system with
# python3, python3-venv and ca-certificates works too (CI builds on one made by debootstrap:
# deploy/image-check).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# Build stage: wheels for the package and its dependencies (compilers stay here).
FROM ${BASE_IMAGE} AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A CA bundle for pip when the build runs behind a TLS-intercepting proxy (a path mounted
# into the build, e.g. `-v /etc/ssl/certs/ca-certificates.crt:/run/build-ca.crt:ro`).
ARG BUILD_CA_BUNDLE=
COPY pyproject.toml README.md ./
COPY src ./src
# coredis ships a module in Python 3.12 syntax that 3.11 never imports: leave it uncompiled.
RUN if [ -n "$BUILD_CA_BUNDLE" ]; then export PIP_CERT="$BUILD_CA_BUNDLE"; fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-compile . \
    && /opt/venv/bin/python -m compileall -q -x '/coredis/.*_py_312_typing\.py$' /opt/venv

# Final stage: the virtualenv only, a non-root user, no build tools.
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="processor" \
      org.opencontainers.image.description="Worker daemon for AI tasks (text embeddings)"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STATE_DIR=/app/data \
    METRICS_PORT=8001
RUN groupadd --system --gid 10001 processor \
    && useradd --system --uid 10001 --gid processor --home-dir /app --no-create-home processor \
    && mkdir -p /app/data \
    && chown -R processor:processor /app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
USER 10001:10001
VOLUME ["/app/data"]
EXPOSE 8001
STOPSIGNAL SIGTERM
# Liveness without curl: the image's own Python asks /health.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('METRICS_PORT', '8001')}/health\", timeout=4)"]
ENTRYPOINT ["python", "-m", "processor"]
CMD ["run"]
