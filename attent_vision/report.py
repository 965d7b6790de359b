"""Sweep report: the jobs of a Hydra multirun as one table in the layout of the paper's Table 3.

Usage::

    python -m attent_vision.report <sweep_dir> [<more dirs>...] [--out DIR]

Every ``summary.json`` under the given directories (searched recursively) is one job. Jobs sharing (ratio,
interval, selection, scoring) form one cell, reported as mean ± std over its n jobs (seeds). The full-data baseline
(``selection=none``) comes first; the other rows give their time and samples relative to it. A job directory
without a ``summary.json``, or whose status is not ``finished``, is listed under "Failed / incomplete jobs".

Downstream results: a ``downstream.json`` in a job directory, a flat ``{"metric": number}`` object such as
``{"ImageNetS50": 92.3, "NYUv2(S)": 52.6}``, adds one column per metric. Without any, no such column appears.

Writes ``report.md``, ``report.json`` and ``report.png`` into ``--out`` (default: the first directory) and prints
the table. Exits with 2 when no ``summary.json`` is found.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FULL_DATA = "none"
DASH = "–"
SETTINGS = ("ratio", "interval", "selection", "scoring")
# The paper's Table 3 order: Random, then Soft, then Hard; within each, Cosine before Incremental ratio and
# Incremental before Fixed interval. Unknown values go last, alphabetically.
ORDER = {
    "selection": ("none", "random", "soft", "hard"),
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


# ---------------------------------------------------------------------------------------------------------------
# collecting jobs


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_job_dirs(roots: Sequence[Path]) -> list[Path]:
    """Directories under ``roots`` holding a ``summary.json`` or a Hydra ``.hydra/config.yaml``."""
    found: set[Path] = set()
    for root in roots:
        found.update(p.parent.resolve() for p in root.rglob("summary.json"))
        found.update(
            p.parent.parent.resolve() for p in root.rglob("config.yaml") if p.parent.name == ".hydra"
        )
    return sorted(found, key=_natural_key)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_number(value: Any) -> bool:
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
    return {k: str(raw[k]).lower() if raw[k] is not None else "?" for k in SETTINGS}


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
        downstream={k: float(v) for k, v in downstream.items() if _is_number(v)},
        error=error,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------------------------
# rows


def job_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The numbers one finished job contributes: time, samples, final validation losses (overall and per task)."""
    metrics = {k: summary.get(k) for k in SUMMARY_METRICS}
    for task, value in (summary.get("final_val_losses") or {}).items():
        metrics[TASK_PREFIX + task] = value
    return {k: float(v) for k, v in metrics.items() if _is_number(v)}


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
            if _is_number(value):
                row.extra.setdefault(name, []).append(float(value))
    return sorted(
        cells.values(),
        key=lambda r: (
            not r.is_baseline,
            *(_rank(g, r.settings[g]) for g in ("selection", "ratio", "interval", "scoring")),
        ),
    )


def _columns(rows: Sequence[Row], attr: str) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(getattr(row, attr)))
    return list(names)


# ---------------------------------------------------------------------------------------------------------------
# formatting


def time_unit(seconds: Sequence[float]) -> tuple[str, float, str]:
    """One unit and precision for a column: ``(unit, seconds per unit, format spec)``.

    Minutes when the longest time reaches 10 min, else seconds; whole numbers unless every value is small.
    """
    name, scale = ("min", 60.0) if seconds and max(seconds) >= 600 else ("s", 1.0)
    largest = max(seconds, default=0.0) / scale
    return name, scale, ".0f" if largest >= (100 if name == "min" else 10) else ".1f"


def format_change(value: float, reference: float) -> str:
    """Relative change in percent with a real minus sign, e.g. ``−20.0%``."""
    pct = round(100.0 * (value / reference - 1.0), 1)
    return f"{'−' if pct < 0 else '+'}{abs(pct):.1f}%"


def _pm(mean: float, std: float | None, spec: str) -> str:
    return f"{mean:{spec}}" if std is None else f"{mean:{spec}} ± {std:{spec}}"


def format_time(
    mean: float | None, std: float | None, unit: tuple[str, float, str], ref: float | None = None
) -> str:
    """``231 s``, ``92 ± 3 s (−8.0%)`` or ``16.5 min``; the change is relative to ``ref`` (seconds)."""
    if mean is None:
        return "n/a"
    name, scale, spec = unit
    text = f"{_pm(mean / scale, None if std is None else std / scale, spec)} {name}"
    return f"{text} ({format_change(mean, ref)})" if ref and ref > 0 else text


def _cell(row: Row, key: str, spec: str) -> str:
    mean, std = row.stat(key)
    return "n/a" if mean is None else _pm(mean, std, spec)


def _label(value: str) -> str:
    return value if value in (DASH, "?") else value.capitalize()


def markdown_table(rows: Sequence[Row]) -> str:
    """The Table 3 layout: settings, n, time (vs baseline), scoring time, samples, losses, extra columns."""
    baseline = rows[0] if rows and rows[0].is_baseline else None
    ref_time = baseline.stat("wall_time_s")[0] if baseline else None
    ref_samples = baseline.stat("samples_seen")[0] if baseline else None
    wall_unit = time_unit([m for r in rows if (m := r.stat("wall_time_s")[0]) is not None])
    score_unit = time_unit([m for r in rows if (m := r.stat("scoring_time_s")[0]) is not None])
    tasks = [k for k in _columns(rows, "values") if k.startswith(TASK_PREFIX)]
    extras = _columns(rows, "extra")
    losses = [m for r in rows if (m := r.stat("final_val_loss")[0]) is not None]
    best = min(losses) if losses else None

    header = [
        "Ratio",
        "Interval",
        "Selection",
        "Scoring",
        "n",
        "Pretraining time (vs full data)",
        "Scoring time",
        "Samples seen (% of full data)",
        "Final val loss",
        *(f"Val {t.removeprefix(TASK_PREFIX)}" for t in tasks),
        *extras,
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        time_mean, time_std = row.stat("wall_time_s")
        samples, samples_std = row.stat("samples_seen")
        samples_text = "n/a" if samples is None else _pm(samples, samples_std, ",.0f")
        if samples is not None and ref_samples and not row.is_baseline:
            samples_text += f" ({100 * samples / ref_samples:.1f}%)"
        loss = _cell(row, "final_val_loss", ".3f")
        if best is not None and row.stat("final_val_loss")[0] == best:
            loss = f"**{loss}**"
        selection = f"{DASH} (full data)" if row.is_baseline else _label(row.settings["selection"])
        cells = [
            _label(row.settings["ratio"]),
            _label(row.settings["interval"]),
            selection,
            _label(row.settings["scoring"]),
            str(len(row.jobs)),
            format_time(time_mean, time_std, wall_unit, None if row.is_baseline else ref_time),
            format_time(*row.stat("scoring_time_s"), score_unit),
            samples_text,
            loss,
            *(_cell(row, t, ".3f") for t in tasks),
            *(_cell(row, e, ".4g") for e in extras),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _display(path: Path, base: Path) -> str:
    for root in (base.resolve(), Path.cwd()):
        if path.is_relative_to(root):
            return str(path.relative_to(root))
    return str(path)


def failed_table(jobs: Sequence[Job], base: Path) -> str:
    """Markdown table of the jobs that did not finish, with their directory and error."""
    lines = ["| Job | Ratio | Interval | Selection | Scoring | Status | Error |", "|" + " --- |" * 7]
    for job in jobs:
        error = " ".join(str(job.error or "").split()).replace("|", "\\|")
        error = error[:300] + ("…" if len(error) > 300 else "")
        settings = " | ".join(_label(job.settings[k]) for k in SETTINGS)
        lines.append(f"| {_display(job.path, base)} | {settings} | {job.status} | {error} |")
    return "\n".join(lines)


def render_markdown(rows: Sequence[Row], failed: Sequence[Job], roots: Sequence[Path], out: Path) -> str:
    """The whole ``report.md``: table, legend and the failed/incomplete section."""
    n_jobs = sum(len(r.jobs) for r in rows)
    baseline = bool(rows) and rows[0].is_baseline
    notes = [
        "Pretraining time: wall time of the whole run, scoring included"
        + (", with the change vs the full-data baseline." if baseline else " (no full-data baseline found)."),
        "Samples seen: training samples over the run, as % of the full-data baseline's.",
        "Cells with n > 1 show mean ± std over n jobs (seeds). **Bold**: lowest final validation loss.",
    ]
    parts = [
        "# AtteNT sweep report",
        "",
        f"Sources: {', '.join(str(r) for r in roots)}. "
        f"{n_jobs} finished jobs in {len(rows)} cells, {len(failed)} failed/incomplete.",
        "",
        "## Pretraining (layout of the paper's Table 3)",
        "",
        markdown_table(rows),
        "",
        *(f"- {n}" for n in notes),
        "",
        "## Failed / incomplete jobs",
        "",
        failed_table(failed, out) if failed else "None.",
        "",
    ]
    return "\n".join(parts)


def report_data(rows: Sequence[Row], failed: Sequence[Job], roots: Sequence[Path]) -> dict[str, Any]:
    """The rows (and failed jobs) as JSON-ready data, for ``report.json``."""

    def stats(values: Mapping[str, list[float]]) -> dict[str, Any]:
        return {
            k: {
                "mean": statistics.fmean(v),
                "std": statistics.stdev(v) if len(v) > 1 else None,
                "n": len(v),
                "values": v,
            }
            for k, v in values.items()
        }

    baseline = rows[0] if rows and rows[0].is_baseline else None
    out_rows = []
    for row in rows:
        relative: dict[str, float] = {}
        if baseline is not None and row is not baseline:
            for key in ("wall_time_s", "samples_seen"):
                mean, ref = row.stat(key)[0], baseline.stat(key)[0]
                if mean is not None and ref:
                    relative[key] = mean / ref
        out_rows.append(
            {
                **row.settings,
                "baseline": row.is_baseline,
                "n": len(row.jobs),
                "jobs": [str(p) for p in row.jobs],
                "metrics": stats(row.values),
                "extra": stats(row.extra),
                "ratio_to_full_data": relative,
            }
        )
    return {
        "sources": [str(r) for r in roots],
        "rows": out_rows,
        "failed": [{"job": str(j.path), "status": j.status, "error": j.error, **j.settings} for j in failed],
    }


def write_plot(rows: Sequence[Row], path: Path) -> Path:
    """Scatter of final validation loss against pretraining wall time per cell, baseline highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"random": "tab:gray", "soft": "tab:blue", "hard": "tab:orange"}
    points = [
        r for r in rows if r.stat("wall_time_s")[0] is not None and r.stat("final_val_loss")[0] is not None
    ]
    unit, scale, _ = time_unit([r.stat("wall_time_s")[0] for r in points])
    several_scorings = len({r.settings["scoring"] for r in points if not r.is_baseline}) > 1
    fig, ax = plt.subplots(figsize=(8, 5.5), constrained_layout=True)
    labelled: set[str] = set()
    for row in points:
        (x, x_std), (y, y_std) = row.stat("wall_time_s"), row.stat("final_val_loss")
        sel = row.settings["selection"]
        legend = "full data" if row.is_baseline else _label(sel)
        ax.errorbar(
            x / scale,
            y,
            xerr=None if x_std is None else x_std / scale,
            yerr=y_std,
            fmt="*" if row.is_baseline else "o",
            markersize=15 if row.is_baseline else 7,
            color="tab:red" if row.is_baseline else colors.get(sel, "tab:green"),
            capsize=3,
            zorder=3,
            label=None if legend in labelled else legend,
        )
        labelled.add(legend)
        if row.is_baseline:
            ax.axvline(x / scale, color="tab:red", linestyle="--", linewidth=0.8, alpha=0.5)
            ax.axhline(y, color="tab:red", linestyle="--", linewidth=0.8, alpha=0.5)
            text = "full data"
        else:
            text = "/".join(_label(row.settings[k]) for k in ("ratio", "interval", "selection"))
            text += f" [{row.settings['scoring']}]" if several_scorings else ""
        text += f" (n={len(row.jobs)})" if len(row.jobs) > 1 else ""
        ax.annotate(text, (x / scale, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
    if not points:
        ax.text(0.5, 0.5, "no finished job with wall time and val loss", ha="center", transform=ax.transAxes)
    ax.margins(x=0.12, y=0.08)  # room for the labels of the outermost points
    ax.set_xlabel(f"pretraining wall time, scoring included [{unit}]")
    ax.set_ylabel("final validation loss")
    ax.set_title("AtteNT sweep: final val loss vs pretraining time (ratio/interval/selection)")
    ax.grid(alpha=0.3)
    if labelled:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m attent_vision.report",
        description="Summarise a Hydra sweep of AtteNT pretraining runs as a table in the layout of the paper's "
        "Table 3 (report.md, report.json, report.png).",
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep directories or single run directories")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the first dir)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Collect the jobs, write the report files and print the table; returns the exit code."""
    args = parse_args(argv)
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"error: not a directory: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    job_dirs = find_job_dirs(args.dirs)
    if not any((d / "summary.json").is_file() for d in job_dirs):
        where = ", ".join(str(d) for d in args.dirs)
        print(f"error: no summary.json found under {where}", file=sys.stderr)
        if job_dirs:
            print(f"  {len(job_dirs)} job directories without one, e.g. {job_dirs[0]}", file=sys.stderr)
        return 2

    jobs = [load_job(d) for d in job_dirs]
    rows = build_rows(jobs)
    failed = [j for j in jobs if j.status != "finished"]
    out: Path = args.out or args.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(render_markdown(rows, failed, args.dirs, out))
    (out / "report.json").write_text(json.dumps(report_data(rows, failed, args.dirs), indent=2) + "\n")
    write_plot(rows, out / "report.png")

    print(markdown_table(rows))
    if failed:
        print(f"\nFailed / incomplete jobs ({len(failed)}):\n{failed_table(failed, out)}")
    print(f"\nwrote {out / 'report.md'}, report.json, report.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
