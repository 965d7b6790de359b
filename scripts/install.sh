#!/usr/bin/env bash
# The one place that installs attent_vision's Python dependencies (an editable install of this checkout), at the
# exact versions it is tested with: pyproject.toml declares ranges (so the wheel fits a cluster's own torch), and
# this script applies constraints.txt, so a checkout, CI and the image all get the pinned stack.
# The Dockerfile runs it (as root, into the image's Python) and so does CI, through the README's two Quick start
# commands (inside a fresh venv), so CI proves the image's install step works.
#
# Usage: bash scripts/install.sh [EXTRAS]
#   bash scripts/install.sh        pip install -e .            (runtime dependencies)
#   bash scripts/install.sh dev    pip install -e ".[dev]"     (plus the test/lint tools; "a,b" for several)
#
# It installs into whatever `python` is first on PATH: activate the venv first. pip's usual configuration
# (index, find-links, further constraints) applies; nothing else is downloaded.
set -euo pipefail

if (($# > 1)); then
    echo "usage: $0 [EXTRAS]   (e.g. dev)" >&2
    exit 2
fi
extras="${1:-}"
if [[ ! "${extras}" =~ ^[A-Za-z0-9_,-]*$ ]]; then
    echo "install.sh: bad extras '${extras}' (expected names like dev or dev,docs)" >&2
    exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."

target="."
if [[ -n "${extras}" ]]; then
    target=".[${extras}]"
fi

start=${SECONDS}
python -m pip install --no-cache-dir -c constraints.txt -e "${target}"

# Cheap proof that the pinned stack imports (CUDA is the wheel's build, not a GPU check: builds have no GPU).
python -c 'import torch, torchvision; print(f"installed torch {torch.__version__} (CUDA build {torch.version.cuda}), torchvision {torchvision.__version__}")'
echo "install.sh: installed ${target} in $((SECONDS - start)) s"
# .ci/run reads this to split its steps' times (install vs the command that follows it).
if [[ -n "${ATTENT_STEP_LOG:-}" ]]; then echo "$((SECONDS - start))" >>"${ATTENT_STEP_LOG}"; fi
