"""Wall time and final validation loss of full-data pretraining against AtteNT, measured in one sitting.

    python bench/attent_vs_full.py                              # selection=none vs the default (soft/incr/incr)
    python bench/attent_vs_full.py --runs none soft:online hard -- trainer.max_epochs=100
    python bench/attent_vs_full.py --runs none soft soft+scoring.refresh=cycle soft:online infobatch

A run is ``strategy[:scoring][+override...]``: ``soft:full+scoring.refresh=cycle+scoring.cpu_bf16=true``.

Each run is a real `python train.py` subprocess on the same data and epochs (run one after another, so they
share the machine's state). Reads each run's summary.json and prints a JSON line per run plus a markdown table
with time ratios against the first run, scoring time, and the scoring pass as a fraction of a full epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def overrides_for(spec: str) -> list[str]:
    """``soft:full+scoring.refresh=cycle`` -> selection=soft scoring=full scoring.refresh=cycle."""
    head, *extra = spec.split("+")
    strategy, _, scoring = head.partition(":")
    out = [f"selection={strategy}"]
    if scoring:
        out.append(f"scoring={scoring}")
    return [*out, *extra]


def dirname_for(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in spec)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", default=["none", "soft"], help="strategy[:scoring] per run")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench" / time.strftime("%Y%m%d_%H%M%S")))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")
    args = parser.parse_args()
    rows = []
    for spec in args.runs:
        run_dir = Path(args.out) / dirname_for(spec)
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            *overrides_for(spec),
            *args.overrides,
            f"hydra.run.dir={run_dir}",
            "trainer.enable_progress_bar=false",
        ]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        process_s = time.perf_counter() - start
        s = json.loads((run_dir / "summary.json").read_text())
        full_epochs = [h["train_time_s"] for h in s["history"] if h["optimizer_steps"] is not None]
        plan_full = [h for h in s["history"]]
        reselections = s.get("reselections") or 0
        passes = s.get("scoring_passes") or 0
        per_pass = s["scoring_time_s"] / passes if passes else None
        full_epoch_s = statistics.median(full_epochs[:1] + full_epochs) if full_epochs else None
        row = {
            "run": spec,
            "process_s": round(process_s, 1),
            "wall_time_s": s["wall_time_s"],
            "train_time_s": s["train_time_s"],
            "val_time_s": s.get("val_time_s"),
            "scoring_time_s": s["scoring_time_s"],
            "reselections": reselections,
            "scoring_passes": passes,
            "samples_seen": s["samples_seen"],
            "optimizer_steps": s["optimizer_steps"],
            "initial_val_loss": s.get("initial_val_loss"),
            "final_val_loss": s["final_val_loss"],
            "first_epoch_train_s": plan_full[0]["train_time_s"] if plan_full else None,
            "scoring_pass_s": round(per_pass, 3) if per_pass else None,
            "median_epoch_train_s": full_epoch_s,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = rows[0]
    print(
        "\n| run | wall time (s) | vs first | train (s) | scoring (s) | passes | samples seen | final val loss | "
        "scoring pass / full epoch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        frac = f"{r['scoring_pass_s'] / r['first_epoch_train_s']:.2f}" if r["scoring_pass_s"] else "–"
        print(
            f"| {r['run']} | {r['wall_time_s']:.1f} | {r['wall_time_s'] / base['wall_time_s']:.3f} | "
            f"{r['train_time_s']:.1f} | {r['scoring_time_s']:.1f} | {r['scoring_passes']} | {r['samples_seen']} | "
            f"{r['final_val_loss']:.4f} | {frac} |"
        )


if __name__ == "__main__":
    main()
