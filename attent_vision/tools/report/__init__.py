"""Sweep report: the jobs of a Hydra multirun as one table in the layout of the paper's Table 3.

Usage::

    python -m attent_vision.tools.report <sweep_dir> [<more dirs>...] [--out DIR]

Every ``summary.json`` under the given directories (searched recursively) is one job. Jobs sharing (ratio,
interval, selection, scoring) form one cell, reported as mean ± std over its n jobs (seeds). The full-data baseline
(``selection=none``) comes first; the other rows give their time and samples relative to it. A job directory
without a ``summary.json``, or whose status is not ``finished``, is listed under "Failed / incomplete jobs".

Downstream results: a ``downstream.json`` in a job directory, a flat ``{"metric": number}`` object such as
``{"ImageNetS50": 92.3, "NYUv2(S)": 52.6}``, adds one column per metric. Without any, no such column appears.

Writes ``report.md``, ``report.json``, ``report.png`` (final loss against time per cell), ``report_curves.png``
(validation loss against elapsed time per job) and ``report.html`` into ``--out`` (default: the first directory)
and prints the table. ``report.html`` is one self-contained page (images inline as data URIs, no scripts): the
table, both plots, and per job its ``selection.png`` and latest ``selection_gallery/*.png`` and
``reconstructions/*.png``, then the failed jobs with their errors. Exits with 2 when no ``summary.json`` is found.

Modules: ``collect`` (job directories, settings, rows), ``table`` (the table as markdown and JSON), ``plots``,
``html_page`` (``report.html``) and ``cli`` (the command line).
"""

from attent_vision.tools.report.cli import main, parse_args
from attent_vision.tools.report.collect import (
    FULL_DATA,
    SETTINGS,
    Job,
    Row,
    build_rows,
    find_job_dirs,
    job_metrics,
    job_settings,
    load_job,
    loss_curve,
)
from attent_vision.tools.report.html_page import data_uri, html_job, html_table, job_pictures, render_html
from attent_vision.tools.report.plots import write_curves, write_plot
from attent_vision.tools.report.table import (
    Table,
    failed_table,
    format_change,
    format_time,
    markdown_table,
    render_markdown,
    report_data,
    table_data,
    table_notes,
    time_unit,
)

__all__ = [
    "FULL_DATA",
    "SETTINGS",
    "Job",
    "Row",
    "Table",
    "build_rows",
    "data_uri",
    "failed_table",
    "find_job_dirs",
    "format_change",
    "format_time",
    "html_job",
    "html_table",
    "job_metrics",
    "job_pictures",
    "job_settings",
    "load_job",
    "loss_curve",
    "main",
    "markdown_table",
    "parse_args",
    "render_html",
    "render_markdown",
    "report_data",
    "table_data",
    "table_notes",
    "time_unit",
    "write_curves",
    "write_plot",
]
