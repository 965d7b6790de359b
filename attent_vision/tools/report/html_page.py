"""``report.html``: one self-contained page (images inline as data URIs, no scripts) with the table, the plots,
each job's pictures and the failed jobs.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from attent_vision.tools.report.collect import SETTINGS, Job, Row, is_number, natural_key
from attent_vision.tools.report.table import (
    cell_label,
    display_path,
    format_time,
    setting_label,
    table_data,
    table_notes,
    time_unit,
)

HTML_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; line-height: 1.45; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 1.6em; margin: 0 0 4px; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 2px solid #dde1e8;
     padding-bottom: 4px; } h3 { font-size: 1.05em; margin: 0 0 6px; }
.meta, figcaption, .path { color: #5b6475; font-size: 0.9em; }
nav a { margin-right: 14px; }
table { border-collapse: collapse; width: 100%; font-size: 0.82em; margin: 10px 0; }
th, td { border: 1px solid #d5dae2; padding: 4px 6px; text-align: left; vertical-align: top; }
th { background: #eef1f5; } tbody tr:nth-child(even) { background: #fafbfc; }
tr.baseline { background: #fff4e5 !important; }
td.num { text-align: right; }
.table-wrap { overflow-x: auto; }
figure { margin: 12px 0; } img { max-width: 100%; height: auto; border: 1px solid #e3e6ec; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 16px; }
article.job { border: 1px solid #dde1e8; border-radius: 6px; padding: 12px 16px; margin: 16px 0; }
.status { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.8em; font-weight: 600;
          background: #e3f4e8; color: #1e6b35; } .status.bad { background: #fde8e8; color: #9b1c1c; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; font-size: 0.9em; margin: 6px 0; }
dl.facts dt { color: #5b6475; } dl.facts dd { margin: 0; }
.error { color: #9b1c1c; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.85em;
         white-space: pre-wrap; word-break: break-word; }
"""
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
JOB_PICTURES = (
    ("selection.png", "AtteNT schedule and selection ratio (selection.png)"),
    ("selection_gallery/*.png", "highest- and lowest-scored training images at the latest re-selection"),
    ("reconstructions/*.png", "MultiMAE reconstructions of fixed validation samples, latest epoch"),
)


def data_uri(path: Path) -> str:
    """The file as a ``data:`` URI (base64), so the page needs no other file."""
    kind = IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def job_pictures(job_dir: Path) -> list[tuple[Path, str]]:
    """(file, caption) of the job's pictures that exist: its ratio plot and its latest gallery and grid."""
    found = []
    for pattern, caption in JOB_PICTURES:
        matches = sorted((p for p in job_dir.glob(pattern) if p.is_file()), key=natural_key)
        if matches:
            found.append((matches[-1], caption))
    return found


def _figure(path: Path, caption: str, base: Path) -> str:
    alt = html.escape(f"{caption} ({display_path(path, base)})")
    return (
        f'<figure><img src="{data_uri(path)}" alt="{alt}">'
        f"<figcaption>{html.escape(caption)} — <code>{html.escape(display_path(path, base))}</code></figcaption>"
        "</figure>"
    )


def _strong(text: str) -> str:
    """Escapes ``text`` and turns markdown ``**bold**`` into ``<strong>``."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


def html_table(rows: Sequence[Row]) -> str:
    """The Table 3 layout as an HTML table; settings also as ``data-*`` attributes of each row."""
    table = table_data(rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    lines = [f'<div class="table-wrap"><table class="results"><thead><tr>{head}</tr></thead><tbody>']
    for row, cells, best in zip(rows, table.body, table.best, strict=True):
        attrs = " ".join(f'data-{k}="{html.escape(row.settings[k])}"' for k in SETTINGS)
        tds = []
        for i, cell in enumerate(cells):
            text = html.escape(cell)
            if best and i == table.loss_column:
                text = f"<strong>{text}</strong>"
            tds.append(f'<td class="num">{text}</td>' if i >= 4 else f"<td>{text}</td>")
        css = ' class="baseline"' if row.is_baseline else ""
        lines.append(f"<tr{css} {attrs}>{''.join(tds)}</tr>")
    lines.append("</tbody></table></div>")
    return "\n".join(lines)


def html_failed(failed: Sequence[Job], base: Path) -> str:
    """The failed / incomplete jobs as an HTML table with their errors."""
    if not failed:
        return "<p>None.</p>"
    head = "".join(
        f"<th>{h}</th>" for h in ("Job", "Ratio", "Interval", "Selection", "Scoring", "Status", "Error")
    )
    lines = [f'<div class="table-wrap"><table class="failed"><thead><tr>{head}</tr></thead><tbody>']
    for job in failed:
        settings = "".join(f"<td>{html.escape(setting_label(job.settings[k]))}</td>" for k in SETTINGS)
        lines.append(
            f"<tr><td><code>{html.escape(display_path(job.path, base))}</code></td>{settings}"
            f'<td>{html.escape(job.status)}</td><td class="error">{html.escape(str(job.error or ""))}</td></tr>'
        )
    lines.append("</tbody></table></div>")
    return "\n".join(lines)


def _job_facts(job: Job) -> list[tuple[str, str]]:
    summary = job.summary
    facts = [("settings", cell_label(job.settings))]
    if is_number(summary.get("wall_time_s")):
        unit = time_unit([summary["wall_time_s"]])
        facts.append(("wall time", format_time(summary["wall_time_s"], None, unit)))
    for key, label, spec in (
        ("samples_seen", "samples seen", ",.0f"),
        ("epochs", "epochs", "d"),
        ("reselections", "re-selections", "d"),
        ("final_val_loss", "final val loss", ".4f"),
    ):
        if is_number(summary.get(key)):
            facts.append((label, format(summary[key], spec)))
    for key in ("reconstruction_errors", "selection_gallery_errors"):
        if summary.get(key):
            facts.append((key.replace("_", " "), "; ".join(map(str, summary[key]))))
    return facts


def html_job(job: Job, base: Path, anchor: str) -> str:
    """One job: status, key numbers, error, and its pictures inline."""
    ok = job.status == "finished"
    facts = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in _job_facts(job))
    parts = [
        f'<article class="job" id="{anchor}">',
        f"<h3>{html.escape(cell_label(job.settings))} "
        f'<span class="status{"" if ok else " bad"}">{html.escape(job.status)}</span></h3>',
        f'<div class="path"><code>{html.escape(display_path(job.path, base))}</code></div>',
        f'<dl class="facts">{facts}</dl>',
    ]
    if job.error and not ok:
        parts.append(f'<div class="error">{html.escape(str(job.error))}</div>')
    pictures = job_pictures(job.path)
    parts.extend(_figure(path, caption, base) for path, caption in pictures)
    if not pictures:
        parts.append('<p class="meta">No pictures in this job directory.</p>')
    parts.append("</article>")
    return "\n".join(parts)


def render_html(
    rows: Sequence[Row],
    jobs: Sequence[Job],
    failed: Sequence[Job],
    roots: Sequence[Path],
    out: Path,
    plots: Sequence[tuple[Path, str]],
) -> str:
    """The whole ``report.html``: table, plots, each job's pictures and the failed jobs, all in one file.

    Args:
        rows: Table rows (``build_rows``).
        jobs: Every job found (finished ones are shown in table order, then the others).
        failed: The jobs that did not finish.
        roots: The directories searched (shown at the top).
        out: Where the report goes (paths are shown relative to it).
        plots: (PNG, caption) of the sweep-level plots to embed.
    """
    n_jobs = sum(len(r.jobs) for r in rows)
    order = {path: i for i, path in enumerate(p for r in rows for p in r.jobs)}
    shown = sorted(jobs, key=lambda j: (order.get(j.path, len(order)), natural_key(j.path)))
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>AtteNT sweep report</title>",
        f"<style>{HTML_CSS}</style></head><body><main>",
        "<h1>AtteNT sweep report</h1>",
        f'<p class="meta">Sources: {html.escape(", ".join(str(r) for r in roots))}. {n_jobs} finished jobs in '
        f"{len(rows)} cells, {len(failed)} failed/incomplete. Generated {html.escape(generated)}.</p>",
        '<nav><a href="#table">Table</a><a href="#plots">Loss against time</a><a href="#jobs">Jobs</a>'
        '<a href="#failed">Failed / incomplete jobs</a></nav>',
        '<section id="table"><h2>Pretraining (layout of the paper\'s Table 3)</h2>',
        html_table(rows) if rows else "<p>No finished job.</p>",
        "<ul>" + "".join(f"<li>{_strong(n)}</li>" for n in table_notes(rows)) + "</ul></section>",
        '<section id="plots"><h2>Loss against time</h2><div class="plots">',
        *(_figure(path, caption, out) for path, caption in plots if path.is_file()),
        "</div></section>",
        '<section id="jobs"><h2>Jobs</h2>',
        *(html_job(job, out, f"job-{i}") for i, job in enumerate(shown)),
        "</section>",
        f'<section id="failed"><h2>Failed / incomplete jobs ({len(failed)})</h2>',
        html_failed(failed, out),
        "</section></main></body></html>",
        "",
    ]
    return "\n".join(parts)
