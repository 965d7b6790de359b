"""The table in the layout of the paper's Table 3, as text: cell formatting, ``report.md`` and ``report.json``."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attent_vision.tools.report.collect import DASH, FULL_DATA, SETTINGS, TASK_PREFIX, Job, Row


def _columns(rows: Sequence[Row], attr: str) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(getattr(row, attr)))
    return list(names)


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


LABELS = {"infobatch": "InfoBatch"}


def setting_label(value: str) -> str:
    return value if value in (DASH, "?") else LABELS.get(value, value.capitalize())


def cell_label(settings: Mapping[str, str]) -> str:
    if settings["selection"] == FULL_DATA:
        return "full data"
    text = "/".join(
        setting_label(settings[k]) for k in ("ratio", "interval", "selection") if settings[k] != DASH
    )
    return f"{text} [{settings['scoring']}]"


@dataclass
class Table:
    """The Table 3 cells as text, shared by report.md and report.html.

    ``best[i]`` marks body row i as holding the lowest final validation loss (in column ``loss_column``).
    """

    header: list[str]
    body: list[list[str]]
    best: list[bool]
    loss_column: int


def table_data(rows: Sequence[Row]) -> Table:
    """The Table 3 layout: settings, n, time (vs baseline), scoring time, samples, losses, extra columns."""
    baseline = rows[0] if rows and rows[0].is_baseline else None
    ref_time = baseline.stat("wall_time_s")[0] if baseline else None
    ref_samples = baseline.stat("samples_seen")[0] if baseline else None
    wall_unit = time_unit([m for r in rows if (m := r.stat("wall_time_s")[0]) is not None])
    score_unit = time_unit([m for r in rows if (m := r.stat("scoring_time_s")[0]) is not None])
    tasks = [k for k in _columns(rows, "values") if k.startswith(TASK_PREFIX)]
    extras = _columns(rows, "extra")
    losses = [m for r in rows if (m := r.stat("final_val_loss")[0]) is not None]
    lowest = min(losses) if losses else None

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
    body, best = [], []
    for row in rows:
        time_mean, time_std = row.stat("wall_time_s")
        samples, samples_std = row.stat("samples_seen")
        samples_text = "n/a" if samples is None else _pm(samples, samples_std, ",.0f")
        if samples is not None and ref_samples and not row.is_baseline:
            samples_text += f" ({100 * samples / ref_samples:.1f}%)"
        selection = f"{DASH} (full data)" if row.is_baseline else setting_label(row.settings["selection"])
        body.append(
            [
                setting_label(row.settings["ratio"]),
                setting_label(row.settings["interval"]),
                selection,
                setting_label(row.settings["scoring"]),
                str(len(row.jobs)),
                format_time(time_mean, time_std, wall_unit, None if row.is_baseline else ref_time),
                format_time(*row.stat("scoring_time_s"), score_unit),
                samples_text,
                _cell(row, "final_val_loss", ".3f"),
                *(_cell(row, t, ".3f") for t in tasks),
                *(_cell(row, e, ".4g") for e in extras),
            ]
        )
        best.append(lowest is not None and row.stat("final_val_loss")[0] == lowest)
    return Table(header, body, best, header.index("Final val loss"))


def markdown_table(rows: Sequence[Row]) -> str:
    """The Table 3 layout as markdown; the lowest final validation loss in bold."""
    table = table_data(rows)
    lines = ["| " + " | ".join(table.header) + " |", "|" + " --- |" * len(table.header)]
    for cells, best in zip(table.body, table.best, strict=True):
        if best:
            cells = [*cells]
            cells[table.loss_column] = f"**{cells[table.loss_column]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def display_path(path: Path, base: Path) -> str:
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
        settings = " | ".join(setting_label(job.settings[k]) for k in SETTINGS)
        lines.append(f"| {display_path(job.path, base)} | {settings} | {job.status} | {error} |")
    return "\n".join(lines)


def table_notes(rows: Sequence[Row]) -> list[str]:
    """The legend under the table (markdown emphasis)."""
    baseline = bool(rows) and rows[0].is_baseline
    return [
        "Pretraining time: wall time of the whole run, scoring included"
        + (", with the change vs the full-data baseline." if baseline else " (no full-data baseline found)."),
        "Samples seen: training samples over the run, as % of the full-data baseline's.",
        "Cells with n > 1 show mean ± std over n jobs (seeds). **Bold**: lowest final validation loss.",
    ]


def render_markdown(rows: Sequence[Row], failed: Sequence[Job], roots: Sequence[Path], out: Path) -> str:
    """The whole ``report.md``: table, legend and the failed/incomplete section."""
    n_jobs = sum(len(r.jobs) for r in rows)
    notes = table_notes(rows)
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
