# Pipeline worker image (the service target comes with the BentoML service issue).
# The base is an ARG so the image builds from a locally made base where no registry is reachable:
#   buildah bud --isolation chroot --build-arg BASE_IMAGE=localhost/debian-python:3.11 -t agreelens .
# TORCH_PIP_ARGS: how pip finds a CPU build of torch 2.13.0 (an index or --find-links of wheels);
# the build fails rather than ship the multi-GB CUDA wheels.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS worker
ARG TORCH_PIP_ARGS=""
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false \
    BENTOML_DO_NOT_TRACK=true HF_HUB_OFFLINE=1
RUN useradd --create-home --uid 1000 agreelens
WORKDIR /app
COPY pyproject.toml README.md ./
COPY agreelens ./agreelens
RUN pip install torch==2.13.0 ${TORCH_PIP_ARGS} \
 && pip install . \
 && (pip list | grep -iE '^(nvidia-|triton)' | grep -iv nvidia-ml-py && exit 1 || true)
COPY . .
RUN chown -R agreelens /app
USER agreelens
ENTRYPOINT ["agreelens"]
CMD ["--help"]
