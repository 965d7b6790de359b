"""Logger factories that need a decision at run time."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


def wandb_logged_in() -> bool:
    """True when W&B has credentials (env var or ``wandb login``), so an online run can start."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        return bool(wandb.api.api_key)
    except Exception:
        return False


def build_wandb_logger(*, offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """A WandbLogger that runs offline (no account needed) unless the user is logged in.

    Without an explicit ``id``, the id is derived from the run directory (``save_dir``) and the run is resumed
    when it exists, so a requeued or resumed job keeps logging to the same W&B run.

    Args:
        offline: ``None`` decides from the login state; ``True``/``False`` forces the mode.
        **kwargs: Passed to :class:`lightning.pytorch.loggers.WandbLogger`.
    """
    if kwargs.get("id") is None and kwargs.get("save_dir"):
        kwargs["id"] = stable_wandb_id(kwargs["save_dir"])
        kwargs.setdefault("resume", "allow")
    if os.environ.get("WANDB_MODE") in {"offline", "disabled"}:
        offline = True
    if offline is None:
        offline = not wandb_logged_in()
    # Lightning's offline flag sets WANDB_MODE=dryrun, which current wandb no longer honours; say it to wandb.init.
    return WandbLogger(offline=offline, mode="offline" if offline else "online", **kwargs)


class _AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, but a run that resumes in its directory appends to ``metrics.csv``.

    Lightning deletes an existing ``metrics.csv`` when the writer starts; here the header of the existing file is
    kept (and widened when new metrics appear), and rows are appended.
    """

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = sorted(set(self.metrics_keys) | set(header))


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the run's ``metrics.csv`` when the run resumes (see ``truncate_metrics``)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def truncate_metrics(csv_path: str | os.PathLike[str], *, last_step: int) -> int:
    """Drops the rows logged after optimizer step ``last_step`` (work a resumed run redoes); returns rows kept."""
    path = Path(csv_path)
    if not path.is_file():
        return 0
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        fields = reader.fieldnames or []
        rows = [row for row in reader if not row.get("step") or int(float(row["step"])) < last_step]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return len(rows)


def stable_wandb_id(run_dir: str | os.PathLike[str]) -> str:
    """A W&B run id derived from the run directory: a requeued or resumed run continues the same W&B run."""
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
