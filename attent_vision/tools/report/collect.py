"""Collecting the jobs of a sweep: run directories, their settings, summaries and downstream results, and the
table rows (cells of jobs sharing ratio, interval, selection and scoring).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FULL_DATA = "none"
NO_SCHEDULE = ("infobatch",)  # strategies that ignore the ratio and interval schedules
DASH = "–"
SETTINGS = ("ratio", "interval", "selection", "scoring")
# The paper's Table 3 order: Random, then Soft, then Hard; within each, Cosine before Incremental ratio and
# Incremental before Fixed interval. Unknown values go last, alphabetically.
ORDER = {
    "selection": ("none", "random", "soft", "hard", "infobatch"),
    "ratio": ("cosine", "incremental", "constant"),
    "interval": ("incremental", "fixed"),
    "scoring": ("full", "online"),
}
SUMMARY_METRICS = ("wall_time_s", "scoring_time_s", "samples_seen", "final_val_loss")
TASK_PREFIX = "val_loss/"


@dataclass
class Job:
    """One run directory: its settings, status, summary and optional downstream metrics."""

    path: Path
    status: str
    settings: dict[str, str]
    summary: dict[str, Any] = field(default_factory=dict)
    downstream: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Row:
    """One table cell: the finished jobs sharing (ratio, interval, selection, scoring).

    ``values`` holds the summary metrics (``wall_time_s``, ..., ``val_loss/<task>``) and ``extra`` the optional
    extra columns (downstream metrics), each as one value per job that has it.
    """

    settings: dict[str, str]
    jobs: list[Path] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list[float]] = field(default_factory=dict)

    @property
    def is_baseline(self) -> bool:
        return self.settings["selection"] == FULL_DATA

    def stat(self, key: str) -> tuple[float | None, float | None]:
        """Mean and sample standard deviation (None for fewer than two values) of a metric."""
        values = self.values.get(key) or self.extra.get(key) or []
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_job_dirs(roots: Sequence[Path]) -> list[Path]:
    """Directories under ``roots`` holding a ``summary.json`` or a Hydra ``.hydra/config.yaml``."""
    found: set[Path] = set()
    for root in roots:
        found.update(p.parent.resolve() for p in root.rglob("summary.json"))
        found.update(
            p.parent.parent.resolve() for p in root.rglob("config.yaml") if p.parent.name == ".hydra"
        )
    return sorted(found, key=natural_key)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def job_settings(summary: Mapping[str, Any], job_dir: Path) -> dict[str, str]:
    """Ratio, interval, selection and scoring from ``summary["selection"]``, else from ``.hydra/config.yaml``."""
    sel = summary.get("selection")
    if isinstance(sel, dict) and sel.get("strategy"):
        raw = {
            "selection": sel.get("strategy"),
            "ratio": (sel.get("ratio") or {}).get("kind"),
            "interval": (sel.get("interval") or {}).get("kind"),
            "scoring": sel.get("scoring"),
        }
    else:
        cfg = _read_yaml(job_dir / ".hydra" / "config.yaml")

        def get(group: str, key: str) -> Any:
            node = cfg.get(group)
            return node.get(key) if isinstance(node, dict) else None

        raw = {
            "selection": get("selection", "strategy"),
            "ratio": get("ratio", "kind"),
            "interval": get("interval", "kind"),
            "scoring": get("scoring", "mode"),
        }
    settings = {k: str(raw[k]).lower() if raw[k] is not None else "?" for k in SETTINGS}
    if settings["selection"] in NO_SCHEDULE:
        settings.update(ratio=DASH, interval=DASH)
    return settings


def _log_error(job_dir: Path) -> str | None:
    """The last ``[ERROR]`` line of the job's Hydra log, if any."""
    errors = [
        line.split("] - ", 1)[-1].strip()
        for log in sorted(job_dir.glob("*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if "[ERROR]" in line
    ]
    return errors[-1] if errors else None


def load_job(job_dir: Path) -> Job:
    """Read one job directory (``summary.json``, optional ``downstream.json``, Hydra config as fallback)."""
    summary: dict[str, Any] = {}
    path = job_dir / "summary.json"
    if not path.is_file():
        status = "incomplete"
        error = _log_error(job_dir) or "no summary.json (crashed before writing it, or still running)"
    else:
        try:
            summary = json.loads(path.read_text())
            status, error = str(summary.get("status") or "unknown"), summary.get("error")
        except (OSError, json.JSONDecodeError) as exc:
            status, error = "unreadable", f"summary.json: {exc}"
        if status != "finished" and not error:
            error = _log_error(job_dir) or "no error recorded"
    downstream = _read_json(job_dir / "downstream.json")
    return Job(
        path=job_dir.resolve(),
        status=status,
        settings=job_settings(summary, job_dir),
        summary=summary,
        downstream={k: float(v) for k, v in downstream.items() if is_number(v)},
        error=error,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def job_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The numbers one finished job contributes: time, samples, final validation losses (overall and per task)."""
    metrics = {k: summary.get(k) for k in SUMMARY_METRICS}
    for task, value in (summary.get("final_val_losses") or {}).items():
        metrics[TASK_PREFIX + task] = value
    return {k: float(v) for k, v in metrics.items() if is_number(v)}


def _rank(group: str, value: str) -> tuple[int, str]:
    order = ORDER[group]
    return (order.index(value) if value in order else len(order), value)


def build_rows(
    jobs: Sequence[Job], extra: Mapping[Path | str, Mapping[str, float]] | None = None
) -> list[Row]:
    """Group the finished jobs into table rows, baseline first, then in the paper's order.

    Args:
        jobs: Loaded jobs; those not ``finished`` are skipped (they belong in the failed section).
        extra: Optional extra metric columns per job directory (e.g. downstream fine-tuning results). They are
            merged over each job's own ``downstream.json``; a column appears only if some job has it.

    Returns:
        One row per (ratio, interval, selection, scoring) cell; the full-data baseline collapses into one cell.
    """
    extra_by_dir = {Path(k).resolve(): v for k, v in (extra or {}).items()}
    cells: dict[tuple[str, ...], Row] = {}
    for job in jobs:
        if job.status != "finished":
            continue
        settings = dict(job.settings)
        if settings["selection"] == FULL_DATA:  # ratio/interval/scoring do not apply to full-data training
            settings.update(ratio=DASH, interval=DASH, scoring=DASH)
        row = cells.setdefault(tuple(settings[k] for k in SETTINGS), Row(settings))
        row.jobs.append(job.path)
        for name, value in job_metrics(job.summary).items():
            row.values.setdefault(name, []).append(value)
        for name, value in {**job.downstream, **extra_by_dir.get(job.path, {})}.items():
            if is_number(value):
                row.extra.setdefault(name, []).append(float(value))
    return sorted(
        cells.values(),
        key=lambda r: (
            not r.is_baseline,
            *(_rank(g, r.settings[g]) for g in ("selection", "ratio", "interval", "scoring")),
        ),
    )


def loss_curve(job: Job) -> tuple[list[float], list[float]]:
    """(elapsed seconds, validation loss) of one job, from its summary history and ``selection.jsonl``.

    Elapsed time adds up each epoch's training and validation time (``history``) and the teacher's scoring time of
    the re-selections before it (``selection.jsonl``): the run's wall time without start-up and checkpointing. The
    initial validation loss, when measured, is the point at 0 s.
    """
    scoring: dict[int, float] = {}
    for line in _read_lines(job.path / "selection.jsonl"):
        if is_number(line.get("epoch")) and is_number(line.get("scoring_time_s")):
            epoch = int(line["epoch"])
            scoring[epoch] = scoring.get(epoch, 0.0) + float(line["scoring_time_s"])
    times, losses = [], []
    if is_number(job.summary.get("initial_val_loss")):
        times.append(0.0)
        losses.append(float(job.summary["initial_val_loss"]))
    elapsed = 0.0
    history = [h for h in job.summary.get("history") or [] if isinstance(h, dict)]
    for entry in sorted(history, key=lambda h: h.get("epoch", 0) if is_number(h.get("epoch")) else 0):
        epoch = int(entry["epoch"]) if is_number(entry.get("epoch")) else -1
        elapsed += scoring.pop(epoch, 0.0)
        elapsed += sum(float(entry[k]) for k in ("train_time_s", "val_time_s") if is_number(entry.get(k)))
        if is_number(entry.get("val_loss")):
            times.append(elapsed)
            losses.append(float(entry["val_loss"]))
    return times, losses


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; unreadable lines are skipped (a run may be writing it)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out
