"""Every way a run stops has a defined outcome: a resumable checkpoint of the last good state, one message, an exit
status; re-running in the run directory resumes and never silently starts over."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attent_vision.tasks.checkpointing import find_resume_checkpoint

from .conftest import ROOT, TINY_OVERRIDES, read_summary, run_train

LONGER = [*TINY_OVERRIDES, "trainer.max_epochs=4", "data.num_workers=0"]


def _sabotage(action: str, step: int, marker: Path) -> list[str]:
    return [
        "+callbacks.sabotage._target_=tests.sabotage.Sabotage",
        f"+callbacks.sabotage.at_step={step}",
        f"+callbacks.sabotage.action={action}",
        f"+callbacks.sabotage.marker={marker}",
    ]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def _steps(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130), ("SIGUSR1", 138)])
def test_a_stop_signal_checkpoints_exits_nonzero_and_the_rerun_resumes(
    tmp_path: Path, name: str, code: int
) -> None:
    run_dir = tmp_path / "run"
    args = [*LONGER, f"hydra.run.dir={run_dir}"]
    proc = run_train([*args, *_sabotage(f"signal:{name}", 9, tmp_path / "fired")], cwd=tmp_path, check=False)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert f"Stopped by {name} at epoch 1, step 10" in proc.stderr and "Traceback" not in proc.stderr
    stopped = run_dir / "checkpoints" / "stopped.ckpt"
    assert _steps(stopped) == 10  # the batch in flight finished, then the state was saved
    summary = read_summary(run_dir)
    assert summary["status"] == "stopped" and summary["stop"]["signal"] == name
    rows_before = len(_rows(run_dir))

    again = run_train([*args, *_sabotage(f"signal:{name}", 9, tmp_path / "fired")], cwd=tmp_path)
    assert "Resuming from checkpoints/stopped.ckpt (epoch 1, step 10)" in again.stderr
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["optimizer_steps"] == 24 and summary["epochs"] == 4
    assert summary["restarts"] == 1 and [s["status"] for s in summary["sessions"]] == ["stopped", "finished"]
    assert summary["wall_time_s"] == pytest.approx(
        sum(s["wall_time_s"] for s in summary["sessions"]), abs=0.01
    )
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2, 3]
    rows = _rows(run_dir)  # appended, not overwritten: every logged step once
    assert len(rows) > rows_before
    steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_an_exception_leaves_the_trained_state_and_a_traceback_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*LONGER, f"hydra.run.dir={run_dir}"]
    proc = run_train([*args, *_sabotage("raise", 8, tmp_path / "fired")], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "Training failed at" in proc.stderr and "RuntimeError: sabotage at step 8" in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" in (run_dir / "error.txt").read_text()
    assert _steps(run_dir / "checkpoints" / "on_exception.ckpt") == 8
    assert read_summary(run_dir)["status"] == "failed"
    again = run_train(args, cwd=tmp_path)
    assert "Resuming from checkpoints/on_exception.ckpt (epoch 1, step 8)" in again.stderr
    assert read_summary(run_dir)["status"] == "finished"


def test_a_diverging_run_keeps_its_state_apart_and_a_sane_rerun_starts_clean(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_train([*LONGER, "model.blr=1e6", f"hydra.run.dir={run_dir}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "The training loss became non-finite" in proc.stderr and "never resumed from" in proc.stderr
    assert "Traceback" not in proc.stderr
    diverged = list((run_dir / "checkpoints" / "diverged").glob("step_*.ckpt"))
    assert len(diverged) == 1 and not (run_dir / "checkpoints" / "on_exception.ckpt").exists()
    assert read_summary(run_dir)["status"] == "diverged"
    # The diverged state is no candidate: a rerun with a sane learning rate trains from the last good state.
    last_good = find_resume_checkpoint(run_dir)
    again = run_train([*LONGER, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    if last_good is None:
        assert "Resuming" not in again.stderr
    else:
        assert "diverged" not in str(last_good.path)
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["final_val_loss"] < 50


def test_checkpoints_that_do_not_load_stop_the_rerun_unless_restart_is_asked(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*TINY_OVERRIDES, f"hydra.run.dir={run_dir}"]
    run_train(args, cwd=tmp_path)
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        if not ckpt.is_symlink():
            ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    proc = run_train(args, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "none of them loads" in proc.stderr and "resume=restart" in proc.stderr
    run_train([*args, "resume=restart"], cwd=tmp_path)
    assert list((run_dir / "checkpoints").glob("set_aside_*/*.ckpt"))
    assert read_summary(run_dir)["status"] == "finished"


def test_a_dangling_last_link_falls_back_to_the_newest_epoch_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*LONGER, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"]
    run_train(args, cwd=tmp_path)
    checkpoints = run_dir / "checkpoints"
    epoch_file = checkpoints / "epoch_001.ckpt"
    older = checkpoints / "epoch_000.ckpt"
    older.write_bytes(epoch_file.read_bytes())
    epoch_file.unlink()  # last.ckpt now dangles, as a kill between Lightning's delete and re-link left it
    point = find_resume_checkpoint(run_dir)
    assert point is not None and point.path == older.resolve()
    proc = run_train([*args, "trainer.max_epochs=3"], cwd=tmp_path)
    assert "Resuming from checkpoints/epoch_000.ckpt" in proc.stderr


def test_kill9_right_after_a_checkpoint_never_loses_the_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*LONGER, "trainer.max_epochs=6", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "ATTENT_DATA_DIR": str(tmp_path / "data"), "ATTENT_LOG_DIR": str(tmp_path / "out")}
    run_train(["experiment=smoke", "print_plan=true"], cwd=tmp_path)  # data-free warm-up of the imports cache
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 240
    target = run_dir / "checkpoints" / "epoch_002.ckpt"
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert not last.is_symlink() or last.resolve().is_file(), "last.ckpt dangles"
    point = find_resume_checkpoint(run_dir)
    assert point is not None and point.epoch >= 1
    again = run_train(args, cwd=tmp_path)
    assert "Resuming from" in again.stderr
    assert read_summary(run_dir)["status"] == "finished" and read_summary(run_dir)["epochs"] == 6


def test_ddp_spawn_crash_checkpoint_comes_from_the_workers_and_the_rerun_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*LONGER, "trainer=ddp_cpu", "data.batch_size=4", f"hydra.run.dir={run_dir}"]
    proc = run_train(
        [*args, *_sabotage("raise", 7, tmp_path / "fired")], cwd=tmp_path, check=False, timeout=400
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "RuntimeError: sabotage at step 7" in proc.stderr
    assert (
        _steps(run_dir / "checkpoints" / "on_exception.ckpt") == 7
    )  # the trained state, not the parent's copy
    assert read_summary(run_dir)["optimizer_steps"] == 7
    again = run_train(args, cwd=tmp_path, timeout=400)
    assert "Resuming from checkpoints/on_exception.ckpt (epoch 1, step 7)" in again.stderr
    assert read_summary(run_dir)["status"] == "finished"


def test_sigterm_to_the_ddp_spawn_launcher_reaches_the_workers(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    marker = tmp_path / "marker"
    args = [*LONGER, "trainer=ddp_cpu", "data.batch_size=4", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "ATTENT_DATA_DIR": str(tmp_path / "data"), "ATTENT_LOG_DIR": str(tmp_path / "out")}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args, *_sabotage("marker", 5, marker)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert "Stopped by SIGTERM" in stderr
    assert _steps(run_dir / "checkpoints" / "stopped.ckpt") == 6


def test_one_bad_job_of_a_multirun_fails_alone_and_the_report_lists_it(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_train(
        ["-m", *TINY_OVERRIDES, "ratio.initial=1.5,0.3", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0  # the sweep as a whole reports the failure, after running every job
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    summaries = {job.name: json.loads((job / "summary.json").read_text()) for job in jobs}
    bad = next(s for name, s in summaries.items() if "1.5" in name)
    good = next(s for name, s in summaries.items() if "0.3" in name)
    assert bad["status"] == "failed" and "ratio.initial: 1.5 is outside (0, 1]" in bad["error"]
    assert good["status"] == "finished"
    report = subprocess.run(
        [sys.executable, "-m", "attent_vision.tools.report", str(sweep)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert "ratio.initial: 1.5 is outside (0, 1]" in report.stdout


def test_a_file_that_breaks_after_the_start_up_check_is_one_message_from_the_worker(tmp_path: Path) -> None:
    from PIL import Image

    from attent_vision.data.synthetic import ensure_synthetic_dataset

    root = ensure_synthetic_dataset(
        tmp_path / "ds", num_train=16, num_val=8, image_size=40, max_objects=2, seed=1
    )
    (root / "meta.json").unlink()  # an ordinary folder dataset now
    victim = sorted((root / "train" / "depth").rglob("*.png"))[3]
    Image.new("L", (40, 40)).save(victim)  # 8-bit: refused when loaded
    args = [
        *TINY_OVERRIDES, "data=multitask_folder", "data.synthetic=null", f"data.root={root}", "data.input_size=32",
        "data.batch_size=4", "data.num_workers=1", "data.num_classes=8", "trainer.max_epochs=1",
        "validate_data=false", "validate_before_training=false",
    ]  # fmt: skip
    proc = run_train(args, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "A data file failed to load" in proc.stderr and f"{victim}: depth must be a 16-bit" in proc.stderr
    assert "DataLoader worker" not in proc.stderr
    # With the start-up check (the default), the same file is found before any training step.
    proc = run_train([a for a in args if not a.startswith("validate_data")], cwd=tmp_path, check=False)
    assert proc.returncode == 1 and str(victim) in proc.stderr and "training did not start" in proc.stderr


def test_a_resumed_run_logs_to_the_same_wandb_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*[a for a in LONGER if a != "logger=csv"], "logger=wandb", f"hydra.run.dir={run_dir}"]
    stopped = run_train(
        [*args, *_sabotage("signal:SIGTERM", 9, tmp_path / "fired")], cwd=tmp_path, check=False
    )
    assert stopped.returncode == 143
    run_train([*args, *_sabotage("signal:SIGTERM", 9, tmp_path / "fired")], cwd=tmp_path)
    ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1, ids


def test_resume_ignores_and_removes_interrupted_writes(tmp_path: Path) -> None:
    from attent_vision.tasks.checkpointing import atomic_torch_save, remove_partial_writes

    ckpts = tmp_path / "checkpoints"
    atomic_torch_save({"state_dict": {}, "epoch": 4, "global_step": 23}, ckpts / "epoch_004.ckpt")
    (ckpts / ".epoch_005.ckpt.tmp-123").write_bytes(b"PK\x03\x04 half a zip")  # a kill during a write
    (ckpts / "last.ckpt").symlink_to("epoch_004.ckpt")
    point = find_resume_checkpoint(tmp_path)
    assert point is not None and (point.epoch, point.global_step) == (4, 23)
    assert [p.name for p in remove_partial_writes(tmp_path)] == [".epoch_005.ckpt.tmp-123"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_004.ckpt", "last.ckpt"]
