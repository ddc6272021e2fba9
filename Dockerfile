# The detector image. Build it with `make image` (deploy/README.md, "The image"), or by hand:
#   docker build -t akconv-detector:0.1.0 .                                     # CPU
#   docker build --build-arg VARIANT=gpu -t akconv-detector:0.1.0-gpu .         # GPU (NVIDIA container runtime)
# Build arguments:
#   PYTHON_IMAGE     the base: the official slim image, or a stand-in made by deploy/image/debian-image.sh
#   VARIANT          cpu (default): without the CUDA libraries torch never loads on a CPU; gpu: all of them
#   PIP_INDEX_URL    the package index pip installs from (a company mirror or proxy)
#   PIP_CA_BUNDLE    a CA bundle inside the build context for pip (a network that intercepts TLS); `make image`
#                    writes the host's into the ignored .build/ folder. Index and bundle are used in the build stages
#                    only: the image carries /opt/venv and /opt/app from them, not them.
# Plain Dockerfile syntax, no `# syntax=` line: BuildKit uses its built-in frontend and fetches nothing, and the
# classic builder builds it the same way.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# The locked dependencies: one large layer that changes only with the lock, shared by every build of the code.
FROM ${PYTHON_IMAGE} AS dependencies
ARG VARIANT=cpu
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_CA_BUNDLE=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_INDEX_URL=${PIP_INDEX_URL}
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# With PIP_CA_BUNDLE empty this copies only the lock; otherwise the bundle lands beside it as /src/<its name>.
COPY deploy/image/requirements-${VARIANT}.txt ${PIP_CA_BUNDLE} ./
COPY deploy/image/prune-for-cpu.sh /usr/local/bin/
# Every package from the lock, by hash, nothing resolved at build time (`make lock` writes the lock).
RUN if [ -n "${PIP_CA_BUNDLE}" ]; then export PIP_CERT="/src/${PIP_CA_BUNDLE##*/}"; fi \
    && pip install --no-deps --require-hashes -r "requirements-${VARIANT}.txt" \
    && if [ "${VARIANT}" = cpu ]; then prune-for-cpu.sh "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"; fi

# The project itself, apart in /opt/app (its packages, configs, bundled weights and the two commands): a code change
# rebuilds and ships this small layer only.
FROM dependencies AS app
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
# Its dependencies are all in /opt/venv already; setuptools (from the lock) builds it without the network.
RUN pip install --no-deps --no-build-isolation --target /opt/app . \
    && PYTHONPATH=/opt/app python -c "import torch, model, service.app; print(torch.nn.functional.conv2d(torch.ones(1, 3, 8, 8), torch.ones(1, 3, 3, 3)).sum())"

FROM ${PYTHON_IMAGE} AS runtime
# uid and gid 10001, as the Kubernetes deployment runs it; a system account would take a gid below 1000.
RUN groupadd --gid 10001 detector \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin detector
COPY --from=dependencies /opt/venv /opt/venv
COPY --from=app /opt/app /opt/app
# Ultralytics' settings live under /tmp (model/offline.py): mount /tmp as tmpfs with a read-only root fs.
ENV PATH=/opt/app/bin:/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DETECTOR_HOST=0.0.0.0 \
    DETECTOR_PORT=8000
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# SIGTERM drains: readiness drops at once, new requests get a JSON 503 while the accepted ones are answered, then
# the listener closes (stop grace >= request timeout + 10 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["akconv-serve"]
