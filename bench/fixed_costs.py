"""Per-epoch costs that do not shrink with the AtteNT subset: validation, checkpoint writes, data-loader waits,
the teacher's and the pictures' hooks, logging and loop overhead — measured with Lightning's SimpleProfiler.

    python bench/fixed_costs.py                                   # the default run, full data, 10 epochs
    python bench/fixed_costs.py --epochs 20 --variants "" "trainer.check_val_every_n_epoch=5" -- selection=soft

Each variant is one `python train.py <common overrides> <variant overrides>` run (one after another in this
invocation; compare variants only within it). Prints, per variant, seconds per epoch for each part and its share
of the fit time, as JSON lines and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\|\s*(.+?)\s*\|\s*([\d.e+-]+)\s*\|\s*(\d+)\s*\|\s*([\d.e+-]+)\s*\|")
# Profiler action -> part of the epoch (first match wins; the loop's own totals are skipped).
PARTS = [
    ("training steps", re.compile(r"run_training_batch")),
    ("train data waits", re.compile(r"train_dataloader_next")),
    ("validation", re.compile(r"val_next|validation_step|on_validation|\[_EvaluationLoop\]")),
    ("checkpoint writes", re.compile(r"ModelCheckpoint|GracefulStop|save_checkpoint")),
    ("AtteNT teacher", re.compile(r"AtteNTTeacher|Teacher")),
    ("pictures", re.compile(r"ReconstructionGrid|SelectionGallery")),
]
CONTAINERS = re.compile(r"^(run_training_epoch|Total)$")


def profile(overrides: list[str], out: Path) -> tuple[dict[str, float], dict]:
    """Runs train.py with the SimpleProfiler; returns ({action: total s}, summary.json)."""
    args = [
        *overrides,
        f"hydra.run.dir={out}",
        "trainer.enable_progress_bar=false",
        "+trainer.profiler._target_=lightning.pytorch.profilers.SimpleProfiler",
        f"+trainer.profiler.dirpath={out}",
        "+trainer.profiler.filename=profile",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], env=env, capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        sys.exit(f"train.py {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    actions = {}
    for line in (out / "fit-profile.txt").read_text().splitlines():
        match = ROW.match(line)
        if match and not match.group(1).startswith("Action"):
            actions[match.group(1)] = float(match.group(4))
    return actions, json.loads((out / "summary.json").read_text())


def breakdown(actions: dict[str, float], summary: dict) -> dict[str, float]:
    fit = summary["fit_time_s"]
    parts = dict.fromkeys([name for name, _ in PARTS], 0.0)
    for action, total in actions.items():
        if CONTAINERS.match(action):
            continue
        for name, pattern in PARTS:
            if pattern.search(action):
                parts[name] += total
                break
    parts["other (logging, loop, LR monitor)"] = max(0.0, fit - sum(parts.values()))
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[""],
        help="space-separated overrides per variant ('' = the defaults)",
    )
    parser.add_argument(
        "--subset-ratio",
        type=float,
        default=0.5,
        help="also show each part's share of an AtteNT subset epoch that trains this fraction of the samples "
        "(default 0.5; the default schedule's ratios grow from 0.2 to 1): the training steps shrink, the rest not",
    )
    parser.add_argument("overrides", nargs="*", help="after --: overrides common to every variant")
    args = parser.parse_args()
    common = ["selection=none", f"trainer.max_epochs={args.epochs}", *args.overrides]
    table = []
    with tempfile.TemporaryDirectory(prefix="fixed_costs_") as tmp:
        for i, variant in enumerate(args.variants):
            actions, summary = profile([*common, *variant.split()], Path(tmp) / f"v{i}")
            parts = breakdown(actions, summary)
            epochs, fit = summary["epochs"], summary["fit_time_s"]
            row = {
                "variant": variant or "defaults",
                "epochs": epochs,
                "fit_s": fit,
                "per_epoch_s": {k: round(v / epochs, 3) for k, v in parts.items()},
                "share": {k: round(v / fit, 4) for k, v in parts.items()},
                "final_val_loss": summary.get("final_val_loss"),
            }
            print(json.dumps(row), flush=True)
            table.append(row)
    names = list(table[0]["per_epoch_s"])
    print(f"\nper epoch, s (share of fit time); common overrides: {' '.join(common)}\n")
    print("| variant | fit (s) | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for row in table:
        cells = [f"{row['per_epoch_s'][n]:.3f} ({100 * row['share'][n]:.1f}%)" for n in names]
        print(f"| {row['variant']} | {row['fit_s']:.1f} | " + " | ".join(cells) + " |")
    ratio = args.subset_ratio
    print(
        f"\nshare of a subset epoch at ratio {ratio:g} (training steps x {ratio:g}, every other part unchanged)\n"
    )
    print("| variant | subset epoch (s) | " + " | ".join(names[1:]) + " |")
    print("|---|---|" + "---|" * (len(names) - 1))
    for row in table:
        per_epoch = row["per_epoch_s"]
        subset = ratio * per_epoch[names[0]] + sum(per_epoch[n] for n in names[1:])
        cells = [f"{100 * per_epoch[n] / subset:.1f}%" for n in names[1:]]
        print(f"| {row['variant']} | {subset:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
