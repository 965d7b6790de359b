"""The command line: ``python -m attent_vision.tools.report <sweep_dir> [<more dirs>...] [--out DIR]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from attent_vision.tools.report.collect import build_rows, find_job_dirs, load_job
from attent_vision.tools.report.html_page import render_html
from attent_vision.tools.report.plots import write_curves, write_plot
from attent_vision.tools.report.table import failed_table, markdown_table, render_markdown, report_data


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m attent_vision.tools.report",
        description="Summarise a Hydra sweep of AtteNT pretraining runs as a table in the layout of the paper's "
        "Table 3 (report.md, report.json, report.png, report_curves.png, self-contained report.html).",
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
    write_curves(jobs, out / "report_curves.png")
    plots = [
        (out / "report.png", "final validation loss against pretraining wall time, per cell (report.png)"),
        (out / "report_curves.png", "validation loss against elapsed time, per job (report_curves.png)"),
    ]
    (out / "report.html").write_text(render_html(rows, jobs, failed, args.dirs, out, plots))

    print(markdown_table(rows))
    if failed:
        print(f"\nFailed / incomplete jobs ({len(failed)}):\n{failed_table(failed, out)}")
    print(
        f"\nwrote {out / 'report.md'}, report.json, report.png, report_curves.png, report.html",
        file=sys.stderr,
    )
    return 0
