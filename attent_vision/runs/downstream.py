"""What every downstream run (fine-tuning or a probe) shares: the pretrained weights it starts from, the settings it
records, the result it prints, and the pretraining run's ``downstream.json`` it reports into."""

from __future__ import annotations

import fcntl
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from attent_vision.config import ConfigError
from attent_vision.models.checkpoint import (
    LoadReport,
    load_pretrained,
    resolve_checkpoint,
)
from attent_vision.models.released import WeightsDownloadError

log = logging.getLogger(__name__)


def pretraining_run_dir(source: str | Path) -> Path | None:
    """The train.py run directory behind ``pretrained=``: the directory itself, or the run of a checkpoint in it."""
    path = Path(source)
    candidates = (
        [path] if path.is_dir() else [path.parent.parent] if path.parent.name == "checkpoints" else []
    )
    for directory in candidates:
        if (directory / "summary.json").is_file() or (directory / ".hydra").is_dir():
            return directory
    return None


@contextmanager
def _locked(path: Path):
    """An exclusive lock beside ``path``: parallel sweep jobs update the same downstream.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record_downstream(run_dir: Path, column: str, value: float, details: dict[str, Any]) -> Path:
    """Merges ``{column: value}`` into ``<run_dir>/downstream.json`` and the run's details into downstream_runs.json."""
    target = run_dir / "downstream.json"
    with _locked(target):
        for name, entry in ((target, value), (run_dir / "downstream_runs.json", details)):
            current = json.loads(name.read_text()) if name.is_file() else {}
            current[column] = entry
            tmp = name.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(current, indent=2) + "\n")
            tmp.replace(name)
    return target


def resolve_pretrained(cfg: DictConfig) -> Path | None:
    """The checkpoint file behind ``pretrained=``, or None: a run directory resolves to its last checkpoint, a
    released name (``multimae-b``, ``mae-b``, ...) or an http(s) URL to its file in torch.hub's cache, downloaded
    on first use."""
    if cfg.get("pretrained") is None:
        return None
    try:
        return resolve_checkpoint(str(cfg.pretrained))
    except (FileNotFoundError, WeightsDownloadError, ValueError) as error:
        raise ConfigError(f"pretrained: {error}") from None


def load_encoder(net: Any, source: Path, output_dir: Path) -> LoadReport:
    """Loads the pretrained encoder into ``net``, writing ``<output_dir>/load_report.json``."""
    try:
        report = load_pretrained(net, source, report_path=output_dir / "load_report.json")
    except ValueError as error:  # MissingEncoderWeightsError, or a file that is no checkpoint
        raise ConfigError(f"pretrained: {error}") from None
    log.info("pretrained weights: %s (details in load_report.json)", report.summary())
    return report


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings a downstream run records in summary.json."""
    data = cfg.data
    return {
        "task": cfg.task.name,
        "encoder": cfg.encoder.size,
        "patch_size": cfg.encoder.patch_size,
        "inputs": list(cfg.module.net.in_domains),
        "data_root": str(data.root),
        "embedded_data": data.get("synthetic") is not None,
        "input_size": data.input_size,
        "batch_size": data.batch_size,
        "max_epochs": cfg.trainer.max_epochs,
        "lr": cfg.module.get("lr"),
        "blr": cfg.module.get("blr"),
        "layer_decay": cfg.module.get("layer_decay"),
        "seed": cfg.seed,
        "pretrained": cfg.get("pretrained"),
    }


def print_result(task: str, main: str, values: dict[str, float], chance: dict[str, Any], wall: float) -> None:
    """The result line a downstream run prints, with the main metric's chance level."""
    shown = ", ".join(f"{k} {v:.2f}" for k, v in values.items() if isinstance(v, int | float))
    print(f"{task}: {shown}  ({wall:.1f} s)", flush=True)
    if main in chance:
        print(f"  chance level of {main}: {chance[main]:.2f} ({chance['how']})", flush=True)
