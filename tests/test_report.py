"""The sweep report (attent_vision.tools.report) on a fake Hydra multirun directory: no training is run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from attent_vision.tools import report
from attent_vision.tools.report.table import cell_label

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("rgb", "depth", "semseg", "norm_rgb")


def make_job(
    sweep: Path,
    num: int,
    selection: str,
    ratio: str = "incremental",
    interval: str = "incremental",
    *,
    seed: int = 0,
    wall: float = 100.0,
    samples: int = 20000,
    val: float = 2.5,
    status: str = "finished",
    write_summary: bool = True,
    downstream: dict[str, float] | None = None,
) -> Path:
    """One Hydra job directory: .hydra/overrides.yaml, .hydra/config.yaml and (optionally) summary.json."""
    overrides = [f"selection={selection}", f"ratio={ratio}", f"interval={interval}", f"seed={seed}"]
    job = sweep / f"{num}_{','.join(o for o in overrides if not o.startswith('seed'))}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {
        "seed": seed,
        "selection": {
            "strategy": selection,
            "total_cycles": 10,
            "temperature": 1.0,
            "normalization": "softmax",
        },
        "ratio": {
            "_target_": "attent_vision.selection.RatioSchedule",
            "kind": ratio,
            "initial": 0.2,
            "final": 0.8,
        },
        "interval": {
            "_target_": "attent_vision.selection.IntervalSchedule",
            "kind": interval,
            "initial": 5,
            "max": 10,
        },
        "scoring": {"mode": "full", "reproducible": True, "batch_size": None, "num_workers": None},
    }
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if downstream is not None:
        (job / "downstream.json").write_text(json.dumps(downstream))
    if not write_summary:
        (job / "pretrain.log").write_text(
            "[2026-01-01 00:00:00,000][train][ERROR] - ConfigError: too few epochs\n"
        )
        return job
    summary: dict[str, Any] = {
        "status": status,
        "wall_time_s": wall,
        "fit_time_s": wall - 5,
        "train_time_s": wall - 20,
        "samples_seen": samples,
        "optimizer_steps": samples // 32,
        "epochs": 100,
        "train_images_per_s": 94.3,
        "final_train_loss": val - 0.3,
        "final_val_loss": val,
        "final_val_losses": {t: round(val / 4 + 0.01 * i, 4) for i, t in enumerate(TASKS)},
        "initial_val_loss": 10.6,
        "history": [{"epoch": 0, "train_loss": 9.0, "train_time_s": 1.2, "val_loss": 8.0}],
    }
    if status == "finished":
        summary.update(
            scoring_time_s=0.0 if selection == "none" else 12.5,
            reselections=0 if selection == "none" else 10,
            selection={
                "strategy": selection,
                "ratio": {"kind": ratio, "initial": 0.2, "final": 0.8},
                "interval": {"kind": interval, "initial": 5, "max": 10},
                "total_cycles": 10,
                "temperature": 1.0,
                "normalization": "softmax",
                "scoring": "full",
                "reproducible_scoring": True,
            },
        )
    else:  # a failed run writes no teacher fields: the settings come from .hydra/config.yaml
        summary["error"] = "RuntimeError: CUDA out of memory"
    (job / "summary.json").write_text(json.dumps(summary))
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "2026-01-01_12-00-00"
    make_job(root, 0, "hard", "cosine", "incremental", wall=90, samples=13000, val=2.2)
    make_job(root, 1, "soft", "incremental", "incremental", seed=0, wall=90, samples=13500, val=2.3)
    make_job(root, 2, "soft", "incremental", "incremental", seed=1, wall=94, samples=13500, val=2.5)
    make_job(root, 3, "soft", "cosine", "fixed", wall=80, samples=15000, val=2.4)
    make_job(root, 4, "random", "cosine", "incremental", wall=70, samples=13000, val=2.9)
    make_job(root, 5, "soft", "incremental", "fixed", status="failed")
    make_job(root, 6, "hard", "incremental", "fixed", write_summary=False)
    make_job(root, 10, "none", wall=100, samples=20000, val=2.5)  # the full-data baseline, sorted after 6
    return root


def table_rows(text: str) -> list[list[str]]:
    """Cells of the first markdown table in ``text`` (header first, separator dropped)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    end = next((i for i, line in enumerate(lines) if i and "Job" in line), len(lines))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[:end]]
    return [rows[0], *rows[2:]]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "attent_vision.tools.report", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_table_baseline_first_order_relative_times_and_mean_std(sweep: Path) -> None:
    jobs = [report.load_job(d) for d in report.find_job_dirs([sweep])]
    rows = report.build_rows(jobs)
    header, *body = table_rows(report.markdown_table(rows))
    col = {name: i for i, name in enumerate(header)}
    settings = [tuple(r[col[k]] for k in ("Ratio", "Interval", "Selection")) for r in body]
    assert settings == [
        ("–", "–", "– (full data)"),
        ("Cosine", "Incremental", "Random"),
        ("Cosine", "Fixed", "Soft"),
        ("Incremental", "Incremental", "Soft"),
        ("Cosine", "Incremental", "Hard"),
    ]
    time = col["Pretraining time (vs full data)"]
    assert body[0][time] == "100 s"
    assert body[2][time] == "80 s (−20.0%)"
    assert body[4][time] == "90 s (−10.0%)"
    # the two seeds of incremental/incremental/soft: mean ± std over n=2
    dup = body[3]
    assert dup[col["n"]] == "2"
    assert dup[time] == "92 ± 3 s (−8.0%)"
    assert dup[col["Final val loss"]] == "2.400 ± 0.141"
    assert dup[col["Samples seen (% of full data)"]] == "13,500 ± 0 (67.5%)"
    # best final val loss in bold, per-task columns present, no downstream columns without downstream.json
    assert body[4][col["Final val loss"]] == "**2.200**"
    assert {f"Val {t}" for t in TASKS} <= set(header)
    assert "ImageNetS50" not in header
    data = report.report_data(rows, [], [sweep])
    assert data["rows"][2]["ratio_to_full_data"]["wall_time_s"] == pytest.approx(0.8)


def test_infobatch_ignores_the_schedules_and_is_named_as_such(tmp_path: Path) -> None:
    root = tmp_path / "multirun"
    make_job(root, 0, "infobatch", wall=80, samples=15000, val=2.4)
    make_job(root, 1, "none", wall=100, samples=20000, val=2.5)
    jobs = [report.load_job(d) for d in report.find_job_dirs([root])]
    header, *body = table_rows(report.markdown_table(report.build_rows(jobs)))
    col = {name: i for i, name in enumerate(header)}
    assert [body[1][col[k]] for k in ("Ratio", "Interval", "Selection")] == ["–", "–", "InfoBatch"]
    infobatch = next(job for job in jobs if job.settings["selection"] == "infobatch")
    assert cell_label(infobatch.settings) == "InfoBatch [full]"


def test_failed_jobs_listed_and_files_written(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = sweep.parent / "report"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    failed = md.split("## Failed / incomplete jobs", 1)[1]
    assert "5_selection=soft,ratio=incremental,interval=fixed" in failed
    assert "RuntimeError: CUDA out of memory" in failed
    assert "6_selection=hard,ratio=incremental,interval=fixed" in failed
    assert "ConfigError: too few epochs" in failed  # taken from the Hydra log of a job without summary.json
    data = json.loads((out / "report.json").read_text())
    assert len(data["rows"]) == 5 and data["rows"][0]["baseline"]
    assert {f["status"] for f in data["failed"]} == {"failed", "incomplete"}
    assert next(f for f in data["failed"] if f["status"] == "failed")["interval"] == "fixed"
    assert (out / "report.png").stat().st_size > 0
    assert "| – | – | – (full data) |" in capsys.readouterr().out


def test_downstream_json_adds_columns(sweep: Path) -> None:
    (sweep / "10_selection=none,ratio=incremental,interval=incremental" / "downstream.json").write_text(
        json.dumps({"ImageNetS50": 92.2, "NYUv2(S)": 51.9})
    )
    soft = sweep / "3_selection=soft,ratio=cosine,interval=fixed"
    (soft / "downstream.json").write_text(json.dumps({"ImageNetS50": 93.2, "NYUv2(S)": 53.6}))
    jobs = [report.load_job(d) for d in report.find_job_dirs([sweep])]
    header, *body = table_rows(report.markdown_table(report.build_rows(jobs)))
    assert header[-2:] == ["ImageNetS50", "NYUv2(S)"]
    assert body[0][-2:] == ["92.2", "51.9"]
    assert body[2][-2:] == ["93.2", "53.6"]
    assert body[1][-2:] == ["n/a", "n/a"]
    # the row builder also takes extra columns directly (e.g. from a later fine-tuning step)
    rows = report.build_rows(jobs, extra={soft: {"NYUv2(D)": 61.4}})
    assert report.markdown_table(rows).splitlines()[0].endswith("| NYUv2(D) |")


def test_cli_prints_table_and_exits_2_without_summaries(sweep: Path, tmp_path: Path) -> None:
    proc = run_cli(str(sweep))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("| Ratio | Interval | Selection |")
    assert "| – | – | – (full data) |" in proc.stdout
    assert (sweep / "report.md").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(str(empty))
    assert proc.returncode == 2
    assert "no summary.json found" in proc.stderr and str(empty) in proc.stderr
