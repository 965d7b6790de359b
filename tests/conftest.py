"""Shared fixtures: composed Hydra configs, helpers that run train.py / finetune.py in a subprocess, and runs built
once per test session (across pytest-xdist workers) for the tests that only read them."""

from __future__ import annotations

import os

# One math thread per test process and per train.py / finetune.py it spawns (they inherit the environment): the
# suite runs on two pytest-xdist workers, and two processes with two threads each on two cores only thrash.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from attent_vision.config import CONF_ROOT, PRIMARY_CONFIG_DIRS  # importing it registers the resolvers

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = CONF_ROOT  # attent_vision/conf: pretrain/, finetune/ and shared/

# Tiny, fast settings shared by the end-to-end tests (a few seconds per run on 2 CPU cores).
TINY_OVERRIDES = [
    "experiment=smoke",
    "selection=none",
    "logger=csv",
    "trainer.enable_progress_bar=false",
]


def _composer(tmp_path: Path, config_name: str) -> Callable[..., DictConfig]:
    def _compose(*overrides: str) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(PRIMARY_CONFIG_DIRS[config_name]), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
            cfg.hydra.runtime.cwd = str(tmp_path)
        HydraConfig.instance().set_config(cfg)
        return cfg

    return _compose


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose ``train.yaml`` (attent_vision/conf/pretrain) with overrides, outputs and data under ``tmp_path``."""
    yield _composer(tmp_path, "train")
    GlobalHydra.instance().clear()


@pytest.fixture
def compose_finetune(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose ``finetune.yaml`` (attent_vision/conf/finetune) with overrides, outputs and data under ``tmp_path``."""
    yield _composer(tmp_path, "finetune")
    GlobalHydra.instance().clear()


def tiny_multimae(**overrides):
    """A seeded micro MultiMAE (patch 8, 32 px, 8 semseg classes, one small decoder block) for checkpoint tests."""
    from attent_vision.models import build_pretrain_multimae

    torch.manual_seed(0)
    settings = dict(
        size="micro",
        patch_size=8,
        image_size=32,
        semseg_num_classes=8,
        decoder_dim=64,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    return build_pretrain_multimae(**{**settings, **overrides})


def run_train(
    args: list[str],
    *,
    cwd: Path,
    timeout: int = 300,
    check: bool = True,
    env_overrides: dict[str, str | None] | None = None,
    script: str = "train.py",
) -> subprocess.CompletedProcess:
    """Run ``python train.py`` (or another entry point) like a user would, with data and outputs inside ``cwd``."""
    env = {
        **os.environ,
        "ATTENT_DATA_DIR": str(cwd / "data"),
        "ATTENT_LOG_DIR": str(cwd / "outputs"),
        "WANDB_MODE": "offline",
        "PYTHONWARNINGS": "ignore",
    }
    for key, value in (env_overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} {args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def assert_resumed_history_matches(resumed: list[dict], full: list[dict], *, rel: float = 1e-6) -> None:
    """Every epoch of a resumed run's summary history has the uninterrupted run's train loss, and its validation
    loss on the same epochs (pretraining validates every 5th epoch and the last; the others have none)."""
    by_epoch = {h["epoch"]: h for h in full}
    validated = 0
    for h in resumed:
        expected = by_epoch[h["epoch"]]
        assert h["train_loss"] == pytest.approx(expected["train_loss"], rel=rel, abs=1e-7)
        assert (h.get("val_loss") is None) == (expected.get("val_loss") is None), h["epoch"]
        if h.get("val_loss") is not None:
            assert h["val_loss"] == pytest.approx(expected["val_loss"], rel=rel, abs=1e-7)
            validated += 1
    assert validated, "no validated epoch to compare"


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def run_finetune(args: list[str], *, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python finetune.py`` like a user would, with data and outputs inside ``cwd``."""
    return run_train(args, cwd=cwd, script="finetune.py", **kwargs)


# Tiny fine-tuning settings (seconds per run): small embedded sets, 32 px, micro encoder, two epochs.
SHARED_TINY = [
    "data.synthetic.num_train=24",
    "data.synthetic.num_eval=10",
    "data.synthetic.image_size=40",
    "data.batch_size=4",
]
FINETUNE_TINY = {task: [f"task={task}", *SHARED_TINY] for task in ("cls", "semseg", "depth")}
FINETUNE_TINY["cls"] = ["task=cls", *SHARED_TINY[1:3], "data.synthetic.num_train=48", "data.batch_size=8"]
FINETUNE_COMMON = [
    "data.input_size=32",
    "data.num_workers=0",
    "data.eval_batch_size=8",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "callbacks.prediction_gallery.every_n_epochs=1",
    "logger=csv",
]


# ---------------------------------------------------------------------------------------------------------------
# runs built once per session


def shared_run(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that ``build(folder)`` fills once per test session, whichever pytest-xdist worker asks first.

    The other workers wait on a file lock and reuse the folder. Tests only read it: one that changes a run copies
    it first (``copy_run``). A build that fails leaves no ``.done`` marker, so the next asker builds it again and
    sees the same error.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base folders share this parent
    folder = root / f"shared-{name}"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not (folder / ".done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            (folder / ".done").touch()
    return folder


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a shared run (symlinks such as ``last.ckpt`` stay links) for a test that changes it."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One tiny ``train.py`` run (the smoke preset: micro encoder, patch 8, 32 px, full data) shared by the tests
    that only read it: its working directory (with ``data/`` and the command's ``train.stdout`` / ``train.stderr``)
    and its run directory."""

    def build(cwd: Path) -> None:
        proc = run_train([*TINY_OVERRIDES, "hydra.run.dir=outputs/pretrain/runs/smoke"], cwd=cwd)
        (cwd / "train.stdout").write_text(proc.stdout)  # what the user saw, for the tests that read it
        (cwd / "train.stderr").write_text(proc.stderr)

    cwd = shared_run(tmp_path_factory, "smoke", build)
    return cwd, cwd / "outputs" / "pretrain" / "runs" / "smoke"


def ddp_strategy(start_method: str = "fork", **kwargs):
    """Lightning's DDP over gloo for in-process tests, with a 60 s collective timeout so that a rank that dies
    fails the test instead of hanging it. ``fork`` starts the workers without a fresh interpreter each."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(
        start_method=start_method, process_group_backend="gloo", timeout=timedelta(seconds=60), **kwargs
    )


# Fixtures that train or install something once per module or session: a test that asks for one is slow whatever
# its own duration, because `-m "not slow"` would build the fixture just for it.
SLOW_FIXTURES = frozenset(
    {
        "smoke_run",
        "pretrained_run",
        "stopped_and_resumed",
        "lightning_launched",
        "learned_encoder",
        "shipped_encoder",
        "slurm_cluster",
        "selecting_run",
        "reference_run",
        "wheel",
        "sweep",
        "browser",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
