"""Every way a run can stop, tried for real: what it leaves, its exit status, and whether re-running in its
directory resumes and ends exactly like a run that never stopped (same selections, same final losses).

    python bench/stop_outcomes.py                       # SIGKILL x 20 at random times + each other stop, 1 process
    python bench/stop_outcomes.py --ddp --kills 5       # the same under trainer=ddp_cpu (2 gloo processes)

A small deterministic AtteNT run (smoke preset, soft selection over 2 cycles, 8 epochs, num_workers=0,
trainer.deterministic=true) is run once uninterrupted as the reference. Each try runs it again, stops it (a signal
at a random moment, a signal sent from inside at a fixed step, weights turned NaN at a fixed step as a diverging
update would, an injected exception), records what is in checkpoints/ and the exit status, re-runs the same command
in the same directory, and compares selection.jsonl (every re-selection's score quantiles, selected mean and class
histogram) and the final losses with the reference. Prints JSON lines and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "experiment=smoke",
    "selection=soft",
    "selection.total_cycles=2",
    "interval.initial=1",
    "interval.max=2",
    "trainer.max_epochs=8",
    "trainer.deterministic=true",
    "trainer.enable_progress_bar=false",
    "data.num_workers=0",
    "logger=csv",
]
COMPARED = ("epoch", "k", "score_min", "score_median", "score_max", "selected_score_mean", "class_histogram")


def _env(work: Path) -> dict[str, str]:
    return {**os.environ, "ATTENT_DATA_DIR": str(work / "data"), "ATTENT_LOG_DIR": str(work / "outputs"),
            "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}  # fmt: skip


def _train(args: list[str], work: Path, *, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=work, env=_env(work),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _selections(run_dir: Path) -> list[dict]:
    lines = (
        (run_dir / "selection.jsonl").read_text().splitlines()
        if (run_dir / "selection.jsonl").exists()
        else []
    )
    events = {}
    for line in lines:  # a re-selection redone after a restart replaces the earlier line of that epoch
        event = json.loads(line)
        events[event["epoch"]] = {k: event.get(k) for k in COMPARED}
    return [events[e] for e in sorted(events)]


def _final(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {k: summary.get(k) for k in ("status", "final_train_loss", "final_val_loss", "optimizer_steps")}


def _same(a: dict, b: dict) -> bool:
    if a["status"] != "finished" or b["status"] != "finished" or a["optimizer_steps"] != b["optimizer_steps"]:
        return False
    keys = ("final_train_loss", "final_val_loss")
    if any(a[k] is None or b[k] is None for k in keys):
        return False
    return all(abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(b[k])) for k in keys)


def _leftovers(run_dir: Path) -> list[str]:
    folder = run_dir / "checkpoints"
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found.append(f"{path.name}->{os.readlink(path)}" + ("" if path.exists() else " (DANGLING)"))
        elif path.is_file():
            found.append(str(path.relative_to(folder)))
    return found


def try_stop(kind: str, work: Path, base: list[str], reference: tuple[list, dict], *, seed: int) -> dict:
    run_dir = work / "outputs" / f"try_{kind}_{seed}"
    args = [*base, f"hydra.run.dir={run_dir}"]
    extra: list[str] = []
    if kind.startswith("signal:"):
        extra = ["+callbacks.sabotage._target_=tests.sabotage.Sabotage", "+callbacks.sabotage.at_step=20",
                 f"+callbacks.sabotage.action={kind}", f"+callbacks.sabotage.marker={run_dir}.fired"]  # fmt: skip
    elif kind == "exception":
        extra = ["+callbacks.sabotage._target_=tests.sabotage.Sabotage", "+callbacks.sabotage.at_step=20",
                 "+callbacks.sabotage.action=raise", f"+callbacks.sabotage.marker={run_dir}.fired"]  # fmt: skip
    elif kind == "nan":  # weights turn NaN after step 20, as a diverging update does: the next loss is NaN
        extra = ["+callbacks.sabotage._target_=tests.sabotage.Sabotage", "+callbacks.sabotage.at_step=20",
                 "+callbacks.sabotage.action=poison", f"+callbacks.sabotage.marker={run_dir}.fired"]  # fmt: skip
    start = time.perf_counter()
    if kind == "sigkill":
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=work, env=_env(work),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        # A random moment of the training: wait for the first checkpoint, then up to ~the run's length.
        while not (run_dir / "checkpoints").exists() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(0.0, reference[1]["train_s"]))
        proc.send_signal(signal.SIGKILL)
        code = proc.wait()
    else:
        code = _train([*args, *extra], work).returncode
    stopped_after = time.perf_counter() - start
    left = _leftovers(run_dir)
    rerun = _train(args, work)  # the same command (after "nan": with the sane learning rate)
    resumed = next((line.split("Resuming from ", 1)[1] for line in rerun.stderr.splitlines()
                    if "Resuming from" in line), None)  # fmt: skip
    same_selections = _selections(run_dir) == reference[0]
    same_final = _same(_final(run_dir), reference[1]) if rerun.returncode == 0 else False
    return {"stop": kind, "try": seed, "exit_status": code, "stopped_after_s": round(stopped_after, 1),
            "left": left, "rerun_exit": rerun.returncode, "resumed_from": resumed,
            "same_selections": same_selections, "same_final_losses": same_final}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILL tries at random moments")
    parser.add_argument("--ddp", action="store_true", help="trainer=ddp_cpu (2 gloo processes)")
    parser.add_argument(
        "--work", type=Path, default=ROOT / "outputs" / "bench" / time.strftime("stops_%Y%m%d_%H%M%S")
    )
    parser.add_argument("--only", default="", help="comma-separated stop kinds to run (default: all)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = [*BASE, *(["trainer=ddp_cpu", "data.batch_size=4"] if args.ddp else [])]
    ref_dir = args.work / "outputs" / "reference"
    start = time.perf_counter()
    proc = _train([*base, f"hydra.run.dir={ref_dir}"], args.work)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    summary = json.loads((ref_dir / "summary.json").read_text())
    reference = (_selections(ref_dir), {**_final(ref_dir), "train_s": summary.get("fit_time_s") or 30.0})
    print(
        json.dumps({"reference_s": round(time.perf_counter() - start, 1), "reselections": len(reference[0])})
    )
    kinds = [
        *(["sigkill"] * args.kills),
        "signal:SIGTERM",
        "signal:SIGINT",
        "signal:SIGUSR1",
        "nan",
        "exception",
    ]
    if args.only:
        kinds = [k for k in kinds if k in args.only.split(",")]
    rows = []
    for seed, kind in enumerate(kinds):
        row = try_stop(kind, args.work, base, reference, seed=seed)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.work / "stop_outcomes.json").write_text(json.dumps(rows, indent=2))
    mode = "ddp_cpu (2 processes)" if args.ddp else "1 process"
    print(
        f"\n| stop ({mode}) | exit | left in checkpoints/ | re-run resumed from | same selections | same final losses |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['stop']} #{row['try']} after {row['stopped_after_s']} s | {row['exit_status']} | "
              f"{', '.join(row['left']) or '–'} | {row['resumed_from'] or 'start'} | {row['same_selections']} | "
              f"{row['same_final_losses']} |")  # fmt: skip


if __name__ == "__main__":
    main()
