"""The installable package: the wheel built from this checkout, installed into a fresh virtual environment, runs
``attent-train experiment=smoke`` and ``attent-finetune`` from an empty directory (configs found in the package)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (
        f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Into a copy of what git tracks (plus new files), so the build's own build/ and egg-info never land in the checkout.
    src = out / "src"
    files = _run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"]
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    # The venv's setuptools builds it: no build isolation, so nothing is downloaded.
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)]
    )
    (built,) = out.glob("attent_vision-*.whl")
    return built


def test_wheel_holds_the_package_configs_and_metadata(wheel: Path) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert wheel.name.startswith(f"attent_vision-{version}-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        meta_dir = f"attent_vision-{version}.dist-info"
        entry_points = archive.read(f"{meta_dir}/entry_points.txt").decode()
        metadata = archive.read(f"{meta_dir}/METADATA").decode()
    # Every config of the checkout travels with the package (Hydra finds them as pkg://attent_vision.conf.*).
    configs = {str(p.relative_to(ROOT)) for p in (ROOT / "attent_vision" / "conf").rglob("*.yaml")}
    configs = {c for c in configs if "/local/" not in c or c.endswith("default.yaml")}
    assert configs and configs <= names, sorted(configs - names)
    assert "attent-train = attent_vision.cli.train:main" in entry_points
    assert "attent-finetune = attent_vision.cli.finetune:main" in entry_points
    assert f"{meta_dir}/licenses/LICENSE" in names
    # Ranges, not pins: the wheel must install into a cluster's own torch build.
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: torch")]
    assert requires and all("==" not in line for line in requires), requires
    assert not any(name.startswith(("tests/", "bench/")) for name in names)


def test_installed_wheel_runs_from_an_empty_directory(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)])
    # The dependencies are this environment's (installing torch again would take minutes): its site-packages go
    # after the fresh venv's, as a path entry (the checkout's editable-install hook there is not run).
    fresh_site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    (fresh_site / "outer_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "empty"
    work.mkdir()
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": "",
    }
    for var in (
        "VIRTUAL_ENV",
        "ATTENT_DATA_DIR",
        "ATTENT_LOG_DIR",
    ):  # the defaults: data/ and outputs/ in cwd
        env.pop(var, None)
    where = _run(
        [str(python), "-c", "import attent_vision as a; print(a.__file__); print(a.__version__)"],
        cwd=work,
        env=env,
    ).stdout.split()
    assert Path(where[0]).is_relative_to(venv), f"attent_vision imported from {where[0]}, not the wheel"
    assert where[1] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

    _run(
        [str(venv / "bin" / "attent-train"), "experiment=smoke", "trainer.enable_progress_bar=false"],
        cwd=work,
        env=env,
        timeout=600,
    )
    (run_dir,) = (work / "outputs" / "pretrain" / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished", summary.get("status")
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert sorted(p.name for p in work.iterdir()) == ["data", "outputs"]

    finetune_help = _run([str(venv / "bin" / "attent-finetune"), "--help"], cwd=work, env=env).stdout
    assert "task:" in finetune_help and "cls" in finetune_help
