"""Fine-tune every pretraining run of a sweep on the downstream tasks, as one Hydra multirun per task.

Usage::

    python -m attent_vision.tools.finetune_sweep <sweep_dir> [<more dirs>...] [--tasks cls,semseg,depth] [--force]
        [--dry-run] [-- <finetune.py overrides, e.g. trainer.max_epochs=10 hydra/launcher=...>]

Every directory below the given ones that holds a finished ``summary.json`` and a checkpoint is a pretraining run.
For each task, the runs whose ``downstream.json`` lacks that task's column (all of them with ``--force``) are
fine-tuned by ``python finetune.py -m task=<task> pretrained=<run>,<run>,...``; each job records its main metric in
its run's ``downstream.json``, which ``python -m attent_vision.tools.report <sweep_dir>`` shows as Table 3's
ImageNetS50 / NYUv2(S) / NYUv2(D) columns. An interrupted sweep resumes where it stopped: finished (run, task)
pairs are skipped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from attent_vision.config import PRIMARY_CONFIG_DIRS

ROOT = Path(__file__).resolve().parents[2]  # the repository: finetune.py
FINETUNE = ROOT / "finetune.py"
TASKS = ("cls", "semseg", "depth")


def report_column(task: str) -> str:
    """The downstream.json key a task writes (``task.report_column`` of attent_vision/conf/finetune/task/<task>.yaml)."""
    config = yaml.safe_load((PRIMARY_CONFIG_DIRS["finetune"] / "task" / f"{task}.yaml").read_text())
    return config["task"]["report_column"]


def pretraining_runs(directories: Sequence[Path]) -> list[Path]:
    """Run directories with a finished summary.json and at least one checkpoint, sorted."""
    runs = []
    for directory in directories:
        for summary in sorted(Path(directory).rglob("summary.json")):
            run = summary.parent
            try:
                status = json.loads(summary.read_text()).get("status")
            except (OSError, ValueError):
                continue
            if (
                status == "finished"
                and any((run / "checkpoints").glob("*.ckpt"))
                and (run / ".hydra").is_dir()
            ):
                runs.append(run)
    return runs


def pending(runs: Sequence[Path], column: str, force: bool) -> list[Path]:
    if force:
        return list(runs)
    todo = []
    for run in runs:
        path = run / "downstream.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        if column not in done:
            todo.append(run)
    return todo


def _quote(path: Path) -> str:
    # Sweep directory names hold '=' and ',' (override_dirname): quote each path for Hydra's override grammar.
    text = str(path.resolve()).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def finetune_command(task: str, runs: Sequence[Path], extra: Sequence[str]) -> list[str]:
    """The ``finetune.py -m`` command line that fine-tunes ``runs`` on ``task``."""
    return [
        sys.executable,
        str(FINETUNE),
        "-m",
        f"task={task}",
        "pretrained=" + ",".join(map(_quote, runs)),
        *extra,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="Extra arguments after -- go to finetune.py."
    )
    parser.add_argument(
        "dirs", nargs="+", type=Path, help="sweep or run directories to search for pretraining runs"
    )
    parser.add_argument(
        "--tasks", default=",".join(TASKS), help="comma-separated tasks (default: %(default)s)"
    )
    parser.add_argument(
        "--force", action="store_true", help="fine-tune runs that already have the task's result"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {list(TASKS)}")
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    runs = pretraining_runs(args.dirs)
    if not runs:
        print(
            f"no finished pretraining run (summary.json + checkpoints/) under {', '.join(map(str, args.dirs))}"
        )
        return 2
    print(f"{len(runs)} pretraining run(s) found")
    failures = 0
    for task in tasks:
        todo = pending(runs, report_column(task), args.force)
        if not todo:
            print(f"{task}: every run already has {report_column(task)} (use --force to redo)")
            continue
        command = finetune_command(task, todo, extra)
        print(f"{task}: {len(todo)} run(s)\n  {shlex.join(command)}", flush=True)
        if not args.dry_run:
            failures += subprocess.run(command, cwd=Path.cwd()).returncode != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
