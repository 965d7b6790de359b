"""Paths that cannot surprise: the entry points write only into their output and data folders, and the embedded
generators create a data root only where they may, keep their lock inside it, and never write into a real dataset.

The read-only folders are made read-only (0o555) and also snapshotted: a test run as root writes through the
permission bits, and the snapshots catch what it wrote where it should not have.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
import numpy as np
import pytest
from PIL import Image

from attent_vision.config import ConfigError
from attent_vision.data.datamodule import MultiModalDataModule
from attent_vision.data.synthetic import ensure_synthetic_dataset
from attent_vision.data.synthetic.errors import DataRootError
from attent_vision.data.validation_cache import CACHE_NAME
from tests.conftest import FINETUNE_COMMON, FINETUNE_TINY, TINY_OVERRIDES, run_finetune, run_train

TINY_SET = {"num_train": 4, "num_val": 2, "image_size": 16, "max_objects": 2, "seed": 0}
TINY_SET_OVERRIDES = [f"data.synthetic.{key}={value}" for key, value in TINY_SET.items()]


def _snapshot(folder: Path) -> dict[str, int]:
    """Every path below ``folder`` (folders too), with its modification time (0 for folders, whose mtimes change
    when a child is written)."""
    paths = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames:
            paths[os.path.relpath(os.path.join(dirpath, name), folder)] = 0
        for name in filenames:
            path = os.path.join(dirpath, name)
            paths[os.path.relpath(path, folder)] = os.lstat(path).st_mtime_ns
    return paths


def _new_paths(before: dict[str, int], folder: Path) -> list[str]:
    return sorted(set(_snapshot(folder)) - set(before))


def _outside(paths: list[str], *allowed: str) -> list[str]:
    """The paths that lie below none of ``allowed`` (the allowed folders and the folders leading to them pass)."""

    def inside(path: str, folder: str) -> bool:
        return path == folder or path.startswith(folder + os.sep) or folder.startswith(path + os.sep)

    return [p for p in paths if not any(inside(p, a) for a in allowed)]


@pytest.fixture
def read_only() -> Iterator:
    """``read_only(folder)`` makes a folder read-only (0o555) until the test ends."""
    folders: list[Path] = []

    def make(folder: Path) -> Path:
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        folders.append(folder)
        return folder

    yield make
    for folder in folders:
        folder.chmod(0o755)


def _user_env(home: Path) -> dict[str, str | None]:
    """A fresh home folder for the command, with the per-user cache locations left at their defaults in it."""
    home.mkdir()
    return {"HOME": str(home), "XDG_CACHE_HOME": None, "XDG_CONFIG_HOME": None, "MPLCONFIGDIR": None}


def _written_to_home(home: Path) -> list[str]:
    """What the command wrote into the home folder, less matplotlib's per-user cache (``import torch`` writes it in
    any Python program; MPLCONFIGDIR moves it, see docs/data.md)."""
    paths = _outside(_new_paths({}, home), ".cache/matplotlib", ".config/matplotlib")
    return [p for p in paths if p not in (".cache", ".config")]


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _real_multitask_dataset(root: Path) -> Path:
    """A small real dataset in the multi-task layout, <root>/<split>/<modality>/<class>/<stem>.png, no marker."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for stem in ("a", "b"):
            _write_png(
                root / split / "rgb" / "cat" / f"{stem}.png", rng.integers(0, 255, (16, 16, 3), np.uint8)
            )
            _write_png(
                root / split / "depth" / "cat" / f"{stem}.png", rng.integers(0, 65535, (16, 16), np.uint16)
            )
            _write_png(
                root / split / "semseg" / "cat" / f"{stem}.png", rng.integers(0, 8, (16, 16), np.uint8)
            )
    return root


# -- the entry points under a read-only launch folder -------------------------------------------------------------


@pytest.mark.slow
def test_train_and_report_write_only_inside_their_folders(tmp_path: Path, read_only) -> None:
    top = tmp_path / "launch"  # the read-only launch folder, holding the writable output and data folders
    for name in ("outputs", "data"):
        (top / name).mkdir(parents=True)
    read_only(top)
    env = _user_env(tmp_path / "home")
    before = _snapshot(top)
    run_train([*TINY_OVERRIDES, "hydra.run.dir=outputs/pretrain/runs/ro"], cwd=top, env_overrides=env)

    new = _new_paths(before, top)
    assert "data/synthetic_smoke/meta.json" in new
    assert "data/synthetic_smoke/.attent/generate.lock" in new  # the lock lies inside the root ...
    # ... and never beside it (data/.synthetic_smoke.lock); nothing lands in the launch folder itself.
    assert _outside(new, "outputs", "data/synthetic_smoke") == []
    assert _written_to_home(tmp_path / "home") == []

    # The report writes into the directory it reports on, and nowhere else.
    run_dir = top / "outputs" / "pretrain" / "runs" / "ro"
    before = _snapshot(top)
    proc = subprocess.run(
        [sys.executable, "-m", "attent_vision.tools.report", str(run_dir)],
        cwd=top,
        env={**os.environ, "HOME": str(tmp_path / "home"), "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = _new_paths(before, top)
    assert "outputs/pretrain/runs/ro/report.md" in new
    assert _outside(new, "outputs/pretrain/runs/ro") == []


@pytest.mark.slow
def test_finetune_writes_only_inside_its_folders(tmp_path: Path, read_only) -> None:
    top = tmp_path / "launch"
    for name in ("outputs", "data"):
        (top / name).mkdir(parents=True)
    read_only(top)
    env = _user_env(tmp_path / "home")
    before = _snapshot(top)
    run_finetune(
        [*FINETUNE_TINY["cls"], *FINETUNE_COMMON, "trainer.max_epochs=1"],
        cwd=top,
        env_overrides=env,
        timeout=120,
    )

    new = _new_paths(before, top)
    assert "data/downstream/cls/meta.json" in new and "data/downstream/cls/.attent/generate.lock" in new
    assert _outside(new, "outputs", "data/downstream/cls") == []
    assert _written_to_home(tmp_path / "home") == []


# -- where the synthetic data may be generated --------------------------------------------------------------------


@pytest.mark.slow
def test_a_missing_root_outside_the_data_folder_needs_the_flag(
    compose_cfg, tmp_path: Path, read_only
) -> None:
    parent = tmp_path / "elsewhere"
    parent.mkdir()
    read_only(parent)
    root = parent / "synthetic"
    proc = run_train([*TINY_OVERRIDES, f"data.root={root}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f"ConfigError: data.root: {root} does not exist")
        and "data.synthetic.create=true" in last
    )
    assert _snapshot(parent) == {}  # neither the root nor a lock beside it

    # Asked explicitly, it is created there (in a folder the user may write), with its lock inside it.
    parent.chmod(0o755)
    data_dir = f"paths.data_dir={tmp_path / 'data'}"
    cfg = compose_cfg(
        *TINY_OVERRIDES, *TINY_SET_OVERRIDES, f"data.root={root}", "data.synthetic.create=true", data_dir
    )
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    assert sorted(_snapshot(parent)) == ["synthetic", *sorted(f"synthetic/{p}" for p in _snapshot(root))]
    assert (root / ".attent" / "generate.lock").is_file() and (root / "meta.json").is_file()

    # A complete set is reused wherever it lies, without the flag and without writing anything.
    before = _snapshot(root)
    cfg = compose_cfg(*TINY_OVERRIDES, *TINY_SET_OVERRIDES, f"data.root={root}", data_dir)
    hydra.utils.instantiate(cfg.data, _convert_="all").prepare_data()
    assert _snapshot(root) == before and not (tmp_path / "data").exists()


@pytest.mark.slow
def test_a_real_multitask_dataset_is_never_written_into(tmp_path: Path) -> None:
    root = _real_multitask_dataset(tmp_path / "real")
    before = _snapshot(root)
    proc = run_train([*TINY_OVERRIDES, f"data.root={root}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("DataRootError: data.root:") and f"data=multitask_folder data.root={root}" in last
    assert _snapshot(root) == before

    # The folder is a valid multi-task dataset, as the advice says.
    module = MultiModalDataModule(root=str(root), num_classes=8, input_size=16, semseg_stride=4)
    module.validate_files(min_size=8)
    assert len(module.train_dataset()) == 2


def test_other_files_and_other_generators_roots_are_refused(tmp_path: Path, compose_finetune) -> None:
    mixed = tmp_path / "mine"
    mixed.mkdir()
    (mixed / "notes.txt").write_text("keep me")
    with pytest.raises(
        DataRootError, match=r"is not empty and holds no synthetic data \(notes\.txt\); refusing"
    ):
        ensure_synthetic_dataset(mixed, **TINY_SET)
    assert _snapshot(mixed) == {"notes.txt": (mixed / "notes.txt").stat().st_mtime_ns}
    with pytest.raises(ConfigError, match=r"data\.synthetic\.create=false does not create it"):
        ensure_synthetic_dataset(
            tmp_path / "data" / "new", create=False, data_dir=tmp_path / "data", **TINY_SET
        )
    with pytest.raises(ConfigError, match=r"data\.synthetic\.create: must be auto, true or false, got 'yes'"):
        ensure_synthetic_dataset(
            tmp_path / "data" / "new", create="yes", data_dir=tmp_path / "data", **TINY_SET
        )
    assert not (tmp_path / "data").exists()

    # The fine-tuning sets follow the same rules: a missing root outside paths.data_dir is not created ...
    missing = tmp_path / "elsewhere" / "cls"
    cfg = compose_finetune(
        *FINETUNE_TINY["cls"], f"data.root={missing}", f"paths.data_dir={tmp_path / 'data'}"
    )
    with pytest.raises(ConfigError, match=r"data\.root: .* does not exist.*data\.synthetic\.create=true"):
        hydra.utils.instantiate(cfg.data, _convert_="all").prepare_data()
    assert not (tmp_path / "elsewhere").exists()
    # ... and a pretraining set is not overwritten by a fine-tuning one (nor the other way round).
    pretrain = ensure_synthetic_dataset(tmp_path / "data" / "downstream" / "cls", **TINY_SET)
    cfg = compose_finetune(*FINETUNE_TINY["cls"], f"paths.data_dir={tmp_path / 'data'}")
    with pytest.raises(DataRootError, match="holds the embedded pretrain data, not the classification data"):
        hydra.utils.instantiate(cfg.data, _convert_="all").prepare_data()
    assert json.loads((pretrain / "meta.json").read_text())["params"]["num_train"] == TINY_SET["num_train"]


def test_the_data_check_of_a_read_only_root_caches_in_the_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = ensure_synthetic_dataset(tmp_path / "shared" / "set", **TINY_SET)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    # Tests may run as root, which writes through permission bits: the split folders report themselves read-only.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    module = MultiModalDataModule(
        root=str(root), data_dir=str(tmp_path / "data"), num_classes=8, input_size=16
    )
    module.validate_files(min_size=8)
    assert not (root / "train" / CACHE_NAME).exists() and not (tmp_path / "user-cache").exists()
    assert len(list((tmp_path / "data" / ".attent" / "validated").glob("*.json"))) == 2  # train and val
