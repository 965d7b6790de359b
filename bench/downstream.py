"""Downstream quality of a pretraining run against training from scratch, on the embedded data.

Runs (one after the other, in this invocation) ``python train.py`` with the given overrides — or takes an existing
run with ``--pretrained`` — then ``python finetune.py task=<task>`` from scratch and from that run's checkpoint for
every task, and prints each run's wall time, main metric and chance level as JSON and as a markdown table.

    python bench/downstream.py                                  # default pretraining, then 2 x 3 fine-tunings
    python bench/downstream.py --pretrained outputs/pretrain/runs/<run> --tasks cls
    python bench/downstream.py --finetune-args trainer.max_epochs=5 --train-args selection=none
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN = {"cls": "top1", "semseg": "mIoU", "depth": "delta1"}


def _run(script: str, args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"{script} {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pretrained", type=Path, help="an existing train.py run directory (skips pretraining)"
    )
    parser.add_argument("--tasks", default="cls,semseg,depth")
    parser.add_argument("--train-args", nargs="*", default=[], help="overrides for train.py")
    parser.add_argument("--finetune-args", nargs="*", default=[], help="overrides for every finetune.py run")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "outputs" / "bench" / time.strftime("downstream_%Y%m%d_%H%M%S")
    )
    args = parser.parse_args()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    pretrained = args.pretrained
    if pretrained is None:
        pretrained = args.out / "pretrain"
        seconds = _run("train.py", [*args.train_args, f"hydra.run.dir={pretrained}"], env)
        summary = json.loads((pretrained / "summary.json").read_text())
        rows.append({"run": "pretrain (train.py)", "process_s": round(seconds, 1), "wall_time_s": summary["wall_time_s"],
                     "final_val_loss": summary.get("final_val_loss")})  # fmt: skip
    for task in args.tasks.split(","):
        for start in ("scratch", "pretrained"):
            run_dir = args.out / f"{task}_{start}"
            extra = [f"pretrained={pretrained}"] if start == "pretrained" else []
            seconds = _run("finetune.py", [f"task={task}", *extra, *args.finetune_args, f"hydra.run.dir={run_dir}",
                                           "write_downstream=false"], env)  # fmt: skip
            summary = json.loads((run_dir / "summary.json").read_text())
            metric = MAIN[task]
            rows.append({
                "run": f"{task} from {start}",
                "process_s": round(seconds, 1),
                "wall_time_s": summary["wall_time_s"],
                "metric": metric,
                "final": round(summary["metrics"]["final"][metric], 2),
                "best": round(summary["metrics"]["best"][metric], 2),
                "chance": summary["chance"][metric],
                "all_final": {k: round(v, 4) for k, v in summary["metrics"]["final"].items()},
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "downstream_bench.json").write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))
    print(
        "\n| run | wall time (s) | main metric | final | best | chance |\n| --- | --- | --- | --- | --- | --- |"
    )
    for row in rows:
        print(f"| {row['run']} | {row['wall_time_s']:.1f} | {row.get('metric', 'val loss')} | "
              f"{row.get('final', row.get('final_val_loss'))} | {row.get('best', '')} | {row.get('chance', '')} |")  # fmt: skip


if __name__ == "__main__":
    main()
