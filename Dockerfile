# attent_vision training image: `docker run --gpus all IMAGE selection=soft ratio=incremental` passes Hydra overrides;
# fine-tuning: `docker run --gpus all --entrypoint python IMAGE finetune.py task=cls`.
# The base is a pinned CUDA PyTorch runtime; scripts/install.sh (`pip install -e .`) then installs the project's
# pinned stack (torch 2.14.1 wheels bundle their own CUDA libraries). CI runs the same script through the README's
# Quick start commands, so CI exercises this image's install step.
ARG PYTORCH_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${PYTORCH_IMAGE}

ARG UID=1000
ARG GID=1000
# Optional extras for scripts/install.sh, e.g. --build-arg INSTALL_EXTRAS=dev (empty: runtime dependencies only).
ARG INSTALL_EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/attent \
    XDG_CACHE_HOME=/home/attent/.cache \
    WANDB_DIR=/workspace/outputs \
    ATTENT_DATA_DIR=/workspace/data \
    ATTENT_LOG_DIR=/workspace/outputs

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN groupadd --gid "${GID}" attent \
    && useradd -l -m --uid "${UID}" --gid "${GID}" --shell /bin/bash attent \
    && mkdir -p /app /workspace/data /workspace/outputs \
    && chown -R "${UID}:${GID}" /app /workspace

WORKDIR /app

# Dependencies first, so editing the sources does not invalidate this layer: only what the install needs is copied.
# It runs as root (pip writes into the base image's Python); the editable install points at /app, and the
# egg-info it writes there is handed to the runtime user.
COPY --chown=${UID}:${GID} pyproject.toml README.md ./
COPY --chown=${UID}:${GID} attent_vision/__init__.py attent_vision/__init__.py
COPY --chown=${UID}:${GID} scripts/install.sh scripts/install.sh
RUN bash scripts/install.sh "${INSTALL_EXTRAS}" \
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
