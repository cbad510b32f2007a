# agreelens images, two targets over one CPU-only Python environment (torch==2.13.0+cpu, never CUDA):
#
#   service  `bentoml serve services.service:AgreeLens` on 0.0.0.0:3000 as a non-root user, with models/large
#            and its calibration / number units baked in (the fallback when no MLflow registry is reachable)
#   worker   the pipeline: `agreelens ...`, `dvc repro`, `python flows/pipeline.py` (entrypoint
#            docker/worker-entrypoint.sh)
#
#   docker build --target service -t agreelens:service .
#   docker build --target worker  -t agreelens:worker  .
#
# Without a registry (`make container-test`, scripts/container-test.sh): a Debian bookworm base made with
# debootstrap, built with buildah:
#   buildah bud --isolation chroot --format docker --build-arg BASE_IMAGE=localhost/agreelens-base --target service .
#
# Build context: this checkout, or a staging folder of the same layout (`CONTAINER_MODEL=tiny make container-test`
# stages one with a tiny model under models/large). What the images read is copied into a throwaway stage,
# set to root:root (service) or agreelens (worker) with 0644 files / 0755 directories there, and copied on
# from it: the modes and owners of the checkout (a umask-077 clone, a model saved 0600) never reach an image.
#
# torch: a CPU wheel torch-2.13.0+cpu-cp311-*.whl in docker/wheels/ (the test script copies it there from
# PIP_FIND_LINKS / /opt/wheels) is installed; without one, torch==2.13.0+cpu comes from TORCH_INDEX_URL
# (PyTorch's CPU index). Either way the build fails if any nvidia-* / triton wheel or a CUDA torch got in.
# docker/pins/constraints.txt, when present (the test script writes `pip freeze` of .venv there), pins every
# other package to the versions the tests ran with; without it pip takes the newest that fit.
# PIP_CA_BUNDLE: a CA bundle path for pip inside the build (a TLS-intercepting proxy), e.g. with buildah
#   -v /etc/ssl/certs/ca-certificates.crt:/etc/pip-ca.crt:ro --build-arg PIP_CA_BUNDLE=/etc/pip-ca.crt
# (a build-time mount: the file is never stored in an image).
ARG BASE_IMAGE=python:3.11-slim

# ------------------------------------------------------------------------------------------- base
FROM ${BASE_IMAGE} AS base
ENV LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    BENTOML_DO_NOT_TRACK=true DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN useradd --create-home --uid 1000 --user-group --shell /bin/sh agreelens

# ------------------------------------------------------------------------------------------- torch (CPU)
# torch alone (no dependencies from here: the next stages install them under the constraints)
FROM base AS torch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_CA_BUNDLE=
COPY docker/wheels/ /tmp/wheels/
RUN set -eu; [ -z "$PIP_CA_BUNDLE" ] || export PIP_CERT="$PIP_CA_BUNDLE"; \
    python3 -m venv /opt/venv; \
    wheel=$(ls /tmp/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -n1 || true); \
    if [ -n "$wheel" ]; then pip install --no-deps "$wheel"; \
    else pip install --no-deps --index-url "$TORCH_INDEX_URL" "torch==2.13.0+cpu"; fi; \
    rm -rf /tmp/wheels

# ------------------------------------------------------------------------------------------- service deps
FROM torch AS service-deps
ARG PIP_CA_BUNDLE=
COPY docker/pins/ /tmp/pins/
COPY docker/requirements-service.txt /tmp/pins/requirements-service.txt
RUN set -eu; [ -z "$PIP_CA_BUNDLE" ] || export PIP_CERT="$PIP_CA_BUNDLE"; \
    touch /tmp/pins/constraints.txt; \
    pip install -c /tmp/pins/constraints.txt -r /tmp/pins/requirements-service.txt; \
    bad=$(pip list 2>/dev/null | grep -iE '^(nvidia-|triton)' | grep -iv '^nvidia-ml-py' || true); \
    if [ -n "$bad" ]; then echo "error: CUDA wheels in the image (torch must stay CPU): $bad"; exit 1; fi; \
    python -c "import torch; assert torch.__version__.startswith('2.13.0') and torch.version.cuda is None, torch.__version__; print('torch', torch.__version__, 'CPU')"; \
    rm -rf /tmp/pins

# ------------------------------------------------------------------------------------------- worker deps
# on top of the service's environment (one shared pip layer): the rest of pyproject's dependencies (a layer that
# changes with pyproject.toml and the pins only), then the package itself without dependencies
FROM service-deps AS worker-deps
ARG PIP_CA_BUNDLE=
COPY docker/pins/ /tmp/pins/
COPY pyproject.toml /tmp/src/
RUN set -eu; [ -z "$PIP_CA_BUNDLE" ] || export PIP_CERT="$PIP_CA_BUNDLE"; \
    touch /tmp/pins/constraints.txt; \
    python -c "import tomllib; d = tomllib.load(open('/tmp/src/pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" >/tmp/pins/worker.txt; \
    pip install -c /tmp/pins/constraints.txt -r /tmp/pins/worker.txt; \
    bad=$(pip list 2>/dev/null | grep -iE '^(nvidia-|triton)' | grep -iv '^nvidia-ml-py' || true); \
    if [ -n "$bad" ]; then echo "error: CUDA wheels in the image (torch must stay CPU): $bad"; exit 1; fi; \
    python -c "import torch; assert torch.__version__.startswith('2.13.0') and torch.version.cuda is None, torch.__version__; print('torch', torch.__version__, 'CPU')"; \
    rm -rf /tmp/pins
COPY README.md /tmp/src/
COPY agreelens/ /tmp/src/agreelens/
RUN set -eu; [ -z "$PIP_CA_BUNDLE" ] || export PIP_CERT="$PIP_CA_BUNDLE"; \
    pip install --no-deps /tmp/src; rm -rf /tmp/src

# ------------------------------------------------------------------------------------------- sources, model
# Throwaway stages: the files as the images get them, 0644 / 0755 whatever the checkout's modes
FROM base AS src
WORKDIR /src
COPY pyproject.toml README.md params.yaml dvc.yaml dvc.lock data.dvc .dvcignore ./
COPY .dvc/config .dvc/config
COPY agreelens/ agreelens/
COPY flows/ flows/
COPY corpora/ corpora/
COPY services/service.py services/page.html services/
COPY docker/worker-entrypoint.sh /opt/agreelens-worker
# no git in the worker image: DVC without SCM there (a mounted checkout with .git hides this file)
RUN printf '[core]\n    no_scm = true\n' > .dvc/config.local \
 && chown -R root:root /src /opt/agreelens-worker && chmod -R u=rwX,go=rX /src && chmod 0755 /opt/agreelens-worker

FROM base AS model
WORKDIR /model
COPY models/large/ models/large/
COPY metrics/calibration_large.json metrics/units_large.json metrics/
RUN chown -R root:root /model && chmod -R u=rwX,go=rX /model

# ------------------------------------------------------------------------------------------- worker
# The project skeleton (code, params, dvc.yaml/lock, the committed corpora) in /app, owned by the user, so
# `dvc repro` runs inside the image; or mount a checkout over it: -v "$PWD":/app (with --user "$(id -u)").
# (on the worker-deps layers themselves: no copy of its 2.4 GB environment into a new layer)
FROM worker-deps AS worker
COPY --from=src /opt/agreelens-worker /usr/local/bin/agreelens-worker
WORKDIR /app
COPY --from=src --chown=agreelens:agreelens /src/ /app/
RUN chown agreelens:agreelens /app
# /app first on the path: `agreelens` (dvc.yaml's stage commands) and flows/ run the code in /app, which is
# a mounted checkout's own code when one is mounted there
ENV PYTHONPATH=/app
USER agreelens
ENTRYPOINT ["agreelens-worker"]
CMD ["--help"]

# ------------------------------------------------------------------------------------------- service
# Model: AGREELENS_SERVICE_MODEL, else params.yaml service.model (models:/agreelens-large@champion) from the
# MLflow registry at MLFLOW_TRACKING_URI; unset (or unreachable) -> the baked-in models/large, logged.
FROM base AS service
COPY --from=service-deps /opt/venv /opt/venv
WORKDIR /app
# read-only for the service user: root:root, 0644 files, 0755 directories (set in the src and model stages)
COPY --from=src /src/params.yaml ./
COPY --from=src /src/agreelens/ agreelens/
COPY --from=src /src/services/ services/
COPY --from=model /model/ ./
# MLflow's HTTP defaults (7 retries, backoff factor 2, 120 s timeout) hold the start ~4 min when the registry
# is down before the fallback; these bound it to seconds (override with -e)
ENV AGREELENS_PROJECT=/app BENTOML_HOME=/home/agreelens/bentoml \
    MLFLOW_HTTP_REQUEST_MAX_RETRIES=2 MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1 MLFLOW_HTTP_REQUEST_TIMEOUT=30
USER agreelens
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4)"]
CMD ["bentoml", "serve", "services.service:AgreeLens", "--host", "0.0.0.0", "--port", "3000"]
