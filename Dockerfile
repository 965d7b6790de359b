# attent_vision training image: `docker run --gpus all IMAGE selection=soft ratio=incremental` passes Hydra overrides;
# fine-tuning: `docker run --gpus all --entrypoint python IMAGE finetune.py task=cls`.
# One torch: the base is a slim Python with no torch of its own, and scripts/install.sh installs the pinned stack
# (constraints.txt) into a venv; on Linux x86_64 PyPI's torch wheel is the CUDA build, which brings the CUDA
# libraries as nvidia-* wheels (the host only needs a driver). CI runs the same script through the README's Quick
# start commands; scripts/build_image.sh builds this image and runs the smoke experiment inside it.
# BASE_IMAGE (fully qualified: buildah and podman do not guess a registry): any Debian-like image with python3
# (>= 3.11) and its venv module, e.g. the one build_image.sh --base debootstrap makes where no registry is reachable.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG UID=1000
ARG GID=1000
# Optional extras for scripts/install.sh, e.g. --build-arg INSTALL_EXTRAS=dev (empty: runtime dependencies only).
ARG INSTALL_EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    HOME=/home/attent \
    XDG_CACHE_HOME=/home/attent/.cache \
    WANDB_DIR=/workspace/outputs \
    ATTENT_DATA_DIR=/workspace/data \
    ATTENT_LOG_DIR=/workspace/outputs

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# A venv, not the base's own Python: the same layout on python:*-slim (/usr/local) and on Debian's python3 (/usr,
# which refuses pip installs into the system site-packages).
RUN groupadd --gid "${GID}" attent \
    && useradd -l -m --uid "${UID}" --gid "${GID}" --shell /bin/bash attent \
    && python3 -m venv "${VIRTUAL_ENV}" \
    && mkdir -p /app /workspace/data /workspace/outputs \
    && chown -R "${UID}:${GID}" /app /workspace

WORKDIR /app

# Dependencies first, so editing the sources does not invalidate this layer: only what the install needs is copied
# (the metadata pyproject.toml names: README.md, LICENSE; the pins; the package's root). It runs as root (pip
# writes into the venv); the editable install points at /app, and the egg-info it writes there is handed to the
# runtime user. Behind a TLS-intercepting proxy, pass its CA bundle as the optional build secret `pip_ca`
# (build_image.sh --ca-bundle FILE): pip uses it for this step only, and it is not stored in the image.
COPY --chown=${UID}:${GID} pyproject.toml README.md LICENSE constraints.txt ./
COPY --chown=${UID}:${GID} attent_vision/__init__.py attent_vision/__init__.py
COPY --chown=${UID}:${GID} scripts/install.sh scripts/install.sh
RUN --mount=type=secret,id=pip_ca \
    if [[ -s /run/secrets/pip_ca ]]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && bash scripts/install.sh "${INSTALL_EXTRAS}" \
    && chown -R "${UID}:${GID}" /app

COPY --chown=${UID}:${GID} attent_vision ./attent_vision
COPY --chown=${UID}:${GID} scripts ./scripts
COPY --chown=${UID}:${GID} train.py finetune.py ./

# Data and run outputs live on mounted volumes: -v $PWD/data:/workspace/data -v $PWD/outputs:/workspace/outputs
VOLUME ["/workspace/data", "/workspace/outputs"]

USER ${UID}:${GID}

# Pretraining by default; fine-tuning with `--entrypoint python IMAGE finetune.py task=cls` (same overrides rule).
ENTRYPOINT ["python", "train.py"]
CMD []
