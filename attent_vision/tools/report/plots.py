"""The sweep's plots: final loss against time per cell (``report.png``), validation loss against elapsed time
per job (``report_curves.png``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attent_vision.tools.report.collect import FULL_DATA, Job, Row, loss_curve
from attent_vision.tools.report.table import cell_label, setting_label, time_unit


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
        legend = "full data" if row.is_baseline else setting_label(sel)
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
            text = "/".join(setting_label(row.settings[k]) for k in ("ratio", "interval", "selection"))
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


def write_curves(jobs: Sequence[Job], path: Path) -> Path:
    """Validation loss against elapsed time (training + validation + scoring), one line per job.

    Jobs of one cell (seeds) share a colour and a legend entry; the full-data baseline is red and dashed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(job, *loss_curve(job)) for job in jobs]
    curves = [c for c in curves if c[1]]
    unit, scale, _ = time_unit([max(times) for _, times, _ in curves])
    others = [plt.get_cmap("tab10")(i) for i in range(10) if i != 3]  # tab10's red marks the baseline
    colours: dict[str, Any] = {}
    fig, ax = plt.subplots(figsize=(8, 5.5), constrained_layout=True)
    labelled: set[str] = set()
    for job, times, losses in curves:
        label = cell_label(job.settings)
        baseline = job.settings["selection"] == FULL_DATA
        if label not in colours:
            colours[label] = "tab:red" if baseline else others[len(colours) % len(others)]
        ax.plot(
            [t / scale for t in times],
            losses,
            marker="o",
            markersize=3,
            linewidth=2.2 if baseline else 1.4,
            linestyle="--" if baseline else "-",
            color=colours[label],
            label=None
            if label in labelled
            else label + ("" if job.status == "finished" else f" ({job.status})"),
        )
        labelled.add(label)
    if not curves:
        ax.text(0.5, 0.5, "no job with a validation-loss history", ha="center", transform=ax.transAxes)
    ax.set_xlabel(f"elapsed time: training + validation + scoring [{unit}]")
    ax.set_ylabel("validation loss")
    ax.set_title("AtteNT sweep: validation loss against time, per job")
    ax.grid(alpha=0.3)
    if labelled:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
