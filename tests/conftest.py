"""Shared fixtures: composed Hydra configs and a helper that runs train.py in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import attent_vision.config  # noqa: F401  (resolvers)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

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
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
            cfg.hydra.runtime.cwd = str(tmp_path)
        HydraConfig.instance().set_config(cfg)
        return cfg

    return _compose


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose ``conf/train.yaml`` with overrides, outputs and data under ``tmp_path``."""
    yield _composer(tmp_path, "train")
    GlobalHydra.instance().clear()


@pytest.fixture
def compose_finetune(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose ``conf/finetune.yaml`` with overrides, outputs and data under ``tmp_path``."""
    yield _composer(tmp_path, "finetune")
    GlobalHydra.instance().clear()


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
