# syntax=docker/dockerfile:1
# The detector image: CPU everywhere, GPU with the NVIDIA container runtime (PyPI's torch wheel carries CUDA).
# Build: docker build -t akconv-detector:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
# A regular (non-editable) install of the server: the packages, their configs and the bundled weights land in the venv.
RUN pip install --no-cache-dir './[server]'

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin detector
COPY --from=build /opt/venv /opt/venv
# Ultralytics' settings live under /tmp (model/offline.py): mount /tmp as tmpfs with a read-only root fs.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DETECTOR_HOST=0.0.0.0 \
    DETECTOR_PORT=8000
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# SIGTERM drains: readiness drops at once, accepted requests are answered (stop grace >= request timeout + 10 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["akconv-serve"]
