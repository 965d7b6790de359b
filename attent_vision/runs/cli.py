"""What the entry points do with a run that ends early: one message, an exit status, and a record in the job's
directory. In a multirun the job fails alone (Hydra runs the other jobs and reports the failure at the end)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from attent_vision.config import ConfigError
from attent_vision.data.modalities import DataFormatError
from attent_vision.runs.endings import RunEnded
from attent_vision.runs.stops import requeue_after_stop

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """A multirun job that ended early; Hydra records it and goes on with the other jobs."""


def _multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def record_failure(cfg: DictConfig, message: str) -> None:
    """Leaves the error in the job's summary.json (so the sweep report lists it), unless the run wrote its own."""
    try:
        path = Path(str(cfg.paths.output_dir), "summary.json")
    except Exception:
        return
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        summary = {}
    if summary.get("status") in (None, "finished"):
        summary = {"status": "failed", **{k: v for k, v in summary.items() if k != "status"}}
    summary["error"] = message
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))


def run_entry_point(run: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Runs ``run(cfg)``; bad input and early endings become one message and an exit status, never a traceback."""
    try:
        return run(cfg)
    except (ConfigError, DataFormatError) as error:
        # Bad input is the user's to fix: say what and where, without a traceback from deep inside.
        message, code = f"{type(error).__name__}: {error}", 1
    except RunEnded as ended:
        message, code = str(ended), ended.exit_code
        if ended.requeue:
            print(message, file=sys.stderr, flush=True)
            if requeue_after_stop():  # submitit's handler exits the process itself
                return None
            message, code = message + " No scheduler to requeue with: resume by re-running the command.", 1
    if code == 0:
        print(message, file=sys.stderr, flush=True)
        return None
    record_failure(cfg, message)
    if _multirun():
        log.error(message)
        raise JobFailed(message)
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)
