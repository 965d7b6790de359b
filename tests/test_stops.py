"""Every way a run stops has a defined outcome: a resumable checkpoint of the last good state, one message, an exit
status; re-running in the run directory resumes and never silently starts over."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from attent_vision.runs.callbacks import ValidateLastEpoch
from attent_vision.runs.checkpointing import find_resume_checkpoint
from attent_vision.runs.stops import GracefulStop, RunStopped

from .conftest import (
    ROOT,
    TINY_OVERRIDES,
    assert_resumed_history_matches,
    copy_run,
    read_summary,
    run_train,
    shared_run,
)

LONGER = [*TINY_OVERRIDES, "trainer.max_epochs=4", "data.num_workers=0"]

# A run whose teacher scores: epoch 0 trains on all 48 samples (steps 1-6), a scoring pass of 6 batches at step 6
# selects epoch 1 (step 7), another at step 7 selects epoch 2 (steps 8-11), epoch 3 is full again (steps 12-17).
# Epochs 1 and 3 are validated, in 4 batches. Deterministic, so that a resumed run can match an uninterrupted one.
SELECTING = [
    *(a for a in TINY_OVERRIDES if not a.startswith("selection=")),
    "selection=soft",
    "selection.total_cycles=2",
    "interval=fixed",
    "interval.initial=1",
    "trainer.max_epochs=4",
    "trainer.check_val_every_n_epoch=2",
    "scoring.batch_size=8",
    "data.synthetic.num_val=32",
    "trainer.deterministic=true",
]


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


def _events(run_dir: Path) -> list[dict]:
    """The teacher's selections (selection.jsonl) without their timings."""
    lines = (run_dir / "selection.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("time_s")} for line in lines]


@pytest.fixture(scope="session")
def selecting_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted SELECTING run (its run directory), which the stopped and resumed ones must match."""

    def build(cwd: Path) -> None:
        run_train([*SELECTING, "hydra.run.dir=outputs/pretrain/runs/full"], cwd=cwd)

    run_dir = (
        shared_run(tmp_path_factory, "stops-selecting", build) / "outputs" / "pretrain" / "runs" / "full"
    )
    # The scenario the tests below rely on: scoring passes at steps 6 and 7, validations after epochs 1 and 3.
    history = read_summary(run_dir)["history"]
    assert [(h["optimizer_steps"], h.get("val_loss") is not None) for h in history] == [
        (6, False),
        (7, True),
        (11, False),
        (17, True),
    ]
    assert [e["global_step"] for e in _events(run_dir)] == [6, 7]
    return run_dir


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130), ("SIGUSR1", 138)])
@pytest.mark.slow
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
    if name != "SIGTERM":
        return  # the signals differ only up to here: one re-run (SIGTERM's) checks the resume
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


@pytest.mark.slow
def test_a_stop_during_an_epochs_last_batch_lets_that_epoch_end_before_stopping(tmp_path: Path) -> None:
    """A checkpoint taken after the last batch would resume at the next epoch, skipping this one's end (its summary
    record, the teacher's selection, its checkpoint): the stop waits for them and comes before the next batch."""
    run_dir = tmp_path / "run"
    args = [*LONGER, f"hydra.run.dir={run_dir}"]
    proc = run_train([*args, *_sabotage("signal:SIGTERM", 11, tmp_path / "fired")], cwd=tmp_path, check=False)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Stopped by SIGTERM at epoch 2, step 12" in proc.stderr  # epoch 2 started, without a batch
    assert [h["epoch"] for h in read_summary(run_dir)["history"]] == [0, 1]
    # The stop checkpoint is the state at epoch 1's end, exactly as the epoch's own checkpoint holds it.
    checkpoints = run_dir / "checkpoints"
    stopped, epoch_end = (
        torch.load(checkpoints / name, map_location="cpu", weights_only=False)
        for name in ("stopped.ckpt", "epoch_001.ckpt")
    )
    assert stopped["global_step"] == epoch_end["global_step"] == 12
    assert stopped["loops"] == epoch_end["loops"]
    assert stopped["state_dict"].keys() == epoch_end["state_dict"].keys()
    assert all(torch.equal(v, epoch_end["state_dict"][k]) for k, v in stopped["state_dict"].items())
    again = run_train(args, cwd=tmp_path)
    assert "Resuming from checkpoints/stopped.ckpt (epoch 2, step 12)" in again.stderr
    summary = read_summary(run_dir)
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2, 3] and summary["optimizer_steps"] == 24


def test_a_stop_during_the_scoring_pass_ends_it_within_a_batch_and_the_reruns_score_anew(
    tmp_path: Path, selecting_run: Path
) -> None:
    run_dir = tmp_path / "run"
    args = [*SELECTING, f"hydra.run.dir={run_dir}"]
    stopped = run_dir / "checkpoints" / "stopped.ckpt"
    # SIGTERM lands in the second of the 6 batches of the pass at step 6 (the end of epoch 0).
    first = run_train(
        [*args, *_sabotage("signal-in-scoring:SIGTERM", 6, tmp_path / "m1")], cwd=tmp_path, check=False
    )
    assert first.returncode == 143, first.stderr[-3000:]
    assert "Stopped by SIGTERM at epoch 0, step 6" in first.stderr and "Traceback" not in first.stderr
    # The batch in flight finished; none of the 4 left started.
    assert json.loads((tmp_path / "m1").read_text())["batches_after_signal"] == 0
    state = torch.load(stopped, map_location="cpu", weights_only=False)
    teacher = state["callbacks"]["AtteNTTeacher"]
    assert state["global_step"] == 6 and teacher["prepared_epoch"] == 0 and teacher["scoring_passes"] == 0
    written = stopped.stat().st_mtime_ns

    # The re-run repeats the pass before training; SIGTERM in it stops it too, and the state is still stopped.ckpt.
    second = run_train(
        [*args, *_sabotage("signal-in-scoring:SIGTERM", 0, tmp_path / "m2")], cwd=tmp_path, check=False
    )
    assert second.returncode == 143, second.stderr[-3000:]
    assert "Resuming from checkpoints/stopped.ckpt (epoch 0, step 6)" in second.stderr
    assert f"Stopped by SIGTERM at epoch 1, step 6. The state is saved in {stopped};" in second.stderr
    assert json.loads((tmp_path / "m2").read_text())["batches_after_signal"] == 0
    assert stopped.stat().st_mtime_ns == written  # nothing was trained: nothing new to save

    third = run_train(args, cwd=tmp_path)
    assert "Resuming from checkpoints/stopped.ckpt (epoch 0, step 6)" in third.stderr
    resumed, full = read_summary(run_dir), read_summary(selecting_run)
    assert [s["status"] for s in resumed["sessions"]] == ["stopped", "stopped", "finished"]
    assert [s["optimizer_steps"] for s in resumed["sessions"]] == [6, 6, 17]
    assert _events(run_dir) == _events(selecting_run)  # the same selections from the same scores
    assert resumed["scoring_passes"] == full["scoring_passes"] == 2  # the interrupted passes are not counted
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3]
    assert_resumed_history_matches(resumed["history"], full["history"])


def test_a_stop_during_validation_ends_it_within_a_batch_and_the_rerun_validates_anew(
    tmp_path: Path, selecting_run: Path
) -> None:
    run_dir = tmp_path / "run"
    args = [*SELECTING, f"hydra.run.dir={run_dir}"]
    # SIGTERM lands in the second of the 4 batches of epoch 1's validation (after step 7).
    proc = run_train(
        [*args, *_sabotage("signal-in-validation:SIGTERM", 7, tmp_path / "m")], cwd=tmp_path, check=False
    )
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Stopped by SIGTERM at epoch 1, step 7" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "m").read_text())["batches_after_signal"] == 0
    assert _steps(run_dir / "checkpoints" / "stopped.ckpt") == 7
    assert [h["epoch"] for h in read_summary(run_dir)["history"]] == [0]  # epoch 1 did not end

    again = run_train(args, cwd=tmp_path)
    assert "Resuming from checkpoints/stopped.ckpt (epoch 1, step 7)" in again.stderr
    resumed, full = read_summary(run_dir), read_summary(selecting_run)
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3] and resumed["optimizer_steps"] == 17
    # Epoch 1's validation ran anew, on the same weights; then its end hooks selected epoch 2 as before.
    epoch_1 = {h["epoch"]: h for h in resumed["history"]}[1]
    assert epoch_1["val_loss"] == pytest.approx(full["history"][1]["val_loss"], rel=1e-6)
    assert _events(run_dir) == _events(selecting_run)
    # Epoch 1's mean training loss is gone with the stopped process (its one batch is not trained again).
    assert_resumed_history_matches([h for h in resumed["history"] if h["epoch"] != 1], full["history"])
    assert resumed["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-6)


class _Regression(pl.LightningModule):
    """Linear regression on fixed random data: 4 training and 4 validation batches per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.linear(x), y)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self.linear(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def _loader(self, seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        x, y = torch.randn(16, 2, generator=generator), torch.randn(16, 1, generator=generator)
        return DataLoader(TensorDataset(x, y), batch_size=4)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1)


class _ValidationBatches(pl.Callback):
    """Notes (epoch, batch) of every validation batch that starts; signals SIGTERM as ``signal_at`` starts."""

    def __init__(self, signal_at: tuple[int, int] | None = None) -> None:
        self.signal_at = signal_at
        self.started: list[tuple[int, int]] = []

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        self.started.append((trainer.current_epoch, batch_idx))
        if (trainer.current_epoch, batch_idx) == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_run_stopped_in_its_last_epochs_validation_validates_that_epoch_when_resumed(
    tmp_path: Path,
) -> None:
    """Validating every 5th epoch, a two-epoch run validates only its last (ValidateLastEpoch): a run resumed inside
    that epoch, whose start hooks do not run again, validates it all the same, from its first batch."""
    before = signal.getsignal(signal.SIGTERM)

    def trainer(*callbacks: pl.Callback) -> pl.Trainer:
        return pl.Trainer(
            max_epochs=2,
            check_val_every_n_epoch=5,
            num_sanity_val_steps=0,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=[GracefulStop(dirpath=str(tmp_path / "checkpoints")), ValidateLastEpoch(), *callbacks],
        )

    watched = _ValidationBatches(signal_at=(1, 1))
    with pytest.raises(RunStopped):
        trainer(watched).fit(_Regression())
    assert watched.started == [(1, 0), (1, 1)]  # stopped as the third batch was due
    assert signal.getsignal(signal.SIGTERM) is before  # the fit put the handlers back
    stopped = tmp_path / "checkpoints" / "stopped.ckpt"
    assert _steps(stopped) == 8

    resumed, watched = _Regression(), _ValidationBatches()
    again = trainer(watched)
    again.fit(resumed, ckpt_path=stopped)
    assert watched.started == [(1, 0), (1, 1), (1, 2), (1, 3)] and again.global_step == 8
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    marker = tmp_path / "fired"
    # After step 9: SIGINT, then a slow batch (a minute) during which SIGINT comes again.
    proc = run_train(
        [*LONGER, f"hydra.run.dir={run_dir}", *_sabotage("sigint-twice", 9, marker)],
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    ended = time.time()
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert ended - json.loads(marker.read_text())["signal_time"] < 30  # not after the slow batch
    checkpoints = run_dir / "checkpoints"
    assert (
        f"Stopped by SIGINT at epoch 1, step 9. The state is saved in {checkpoints / 'epoch_000.ckpt'};"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    # The state of an interrupted step is never saved: the re-run resumes from the last checkpoint before it.
    assert not (checkpoints / "stopped.ckpt").exists() and not (checkpoints / "on_exception.ckpt").exists()
    summary = read_summary(run_dir)
    assert summary["status"] == "stopped" and summary["stop"]["signal"] == "SIGINT"
    point = find_resume_checkpoint(run_dir)
    assert point is not None and (point.path.name, point.epoch, point.global_step) == ("epoch_000.ckpt", 0, 6)


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_diverging_run_keeps_its_state_apart_and_the_rerun_resumes_from_the_last_good_checkpoint(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    args = [*LONGER, f"hydra.run.dir={run_dir}"]
    # After step 8 (epoch 0 ended at step 6, with its checkpoint) every weight turns NaN: step 9's loss diverges.
    proc = run_train([*args, *_sabotage("poison", 8, tmp_path / "fired")], cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "The training loss became non-finite" in proc.stderr and "never resumed from" in proc.stderr
    assert "The last good checkpoint is checkpoints/epoch_000.ckpt (epoch 0, step 6)" in proc.stderr
    assert "Traceback" not in proc.stderr
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in (checkpoints / "diverged").iterdir()] == ["step_0000008.ckpt"]
    assert not (checkpoints / "on_exception.ckpt").exists()
    assert read_summary(run_dir)["status"] == "diverged"
    # The diverged state is no candidate: the re-run trains on from the last good one.
    again = run_train(args, cwd=tmp_path)
    assert "Resuming from checkpoints/epoch_000.ckpt (epoch 0, step 6)" in again.stderr
    summary = read_summary(run_dir)
    assert (
        summary["status"] == "finished"
        and summary["optimizer_steps"] == 24
        and summary["final_val_loss"] < 50
    )


def test_checkpoints_that_do_not_load_stop_the_rerun_unless_restart_is_asked(
    tmp_path: Path, smoke_run: tuple[Path, Path]
) -> None:
    cwd = copy_run(smoke_run[0], tmp_path / "work")  # a finished tiny run of its own
    run_dir = cwd / smoke_run[1].relative_to(smoke_run[0])
    args = [*TINY_OVERRIDES, f"hydra.run.dir={run_dir}"]
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        if not ckpt.is_symlink():
            ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    proc = run_train(args, cwd=cwd, check=False)
    assert proc.returncode == 1 and "none of them loads" in proc.stderr and "resume=restart" in proc.stderr
    run_train([*args, "resume=restart"], cwd=cwd)
    assert list((run_dir / "checkpoints").glob("set_aside_*/*.ckpt"))
    assert read_summary(run_dir)["status"] == "finished"


def test_a_dangling_last_link_falls_back_to_the_newest_epoch_file(
    tmp_path: Path, smoke_run: tuple[Path, Path]
) -> None:
    cwd = copy_run(smoke_run[0], tmp_path / "work")  # a finished two-epoch tiny run of its own
    run_dir = cwd / smoke_run[1].relative_to(smoke_run[0])
    args = [*TINY_OVERRIDES, f"hydra.run.dir={run_dir}"]
    checkpoints = run_dir / "checkpoints"
    epoch_file = checkpoints / "epoch_001.ckpt"
    older = checkpoints / "epoch_000.ckpt"
    older.write_bytes(epoch_file.read_bytes())
    epoch_file.unlink()  # last.ckpt now dangles, as a kill between Lightning's delete and re-link left it
    point = find_resume_checkpoint(run_dir)
    assert point is not None and point.path == older.resolve()
    proc = run_train([*args, "trainer.max_epochs=3"], cwd=cwd)
    assert "Resuming from checkpoints/epoch_000.ckpt" in proc.stderr


@pytest.mark.slow
def test_kill9_right_after_a_checkpoint_never_loses_the_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*LONGER, "trainer.max_epochs=6", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "ATTENT_DATA_DIR": str(tmp_path / "data"), "ATTENT_LOG_DIR": str(tmp_path / "out")}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 240
    target = run_dir / "checkpoints" / "epoch_002.ckpt"
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    assert target.exists(), "train.py never wrote epoch_002.ckpt"
    assert proc.poll() is None, f"train.py ended ({proc.returncode}) before it was killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # it died by the kill, mid-run
    last = run_dir / "checkpoints" / "last.ckpt"
    assert not last.is_symlink() or last.resolve().is_file(), "last.ckpt dangles"
    point = find_resume_checkpoint(run_dir)
    assert point is not None and point.epoch >= 1
    again = run_train(args, cwd=tmp_path)
    assert "Resuming from" in again.stderr
    assert read_summary(run_dir)["status"] == "finished" and read_summary(run_dir)["epochs"] == 6


@pytest.mark.slow
def test_kill9_during_an_asynchronous_checkpoint_write_resumes_from_the_last_complete_one(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    marker = tmp_path / "stalled"
    args = [*LONGER, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "ATTENT_DATA_DIR": str(tmp_path / "data"), "ATTENT_LOG_DIR": str(tmp_path / "out")}
    # Step 8 is in epoch 1 (6 steps per epoch): epoch 0's write completes, epoch 1's hangs half-written in the
    # writer thread while the training thread goes on.
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args, *_sabotage("stall-write", 8, marker)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), (
        f"the write never stalled: {proc.stderr.read()[-3000:] if proc.poll() is not None else ''}"
    )
    checkpoints = run_dir / "checkpoints"
    partial = list(checkpoints.glob(".epoch_001.ckpt.tmp-*"))
    assert partial, (
        f"no half-written temporary file: {marker.read_text()} {sorted(p.name for p in checkpoints.iterdir())}"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (checkpoints / "epoch_001.ckpt").exists()
    last = checkpoints / "last.ckpt"
    assert last.is_symlink() and last.resolve() == (checkpoints / "epoch_000.ckpt").resolve(), (
        "last.ckpt must still point to the last complete file"
    )
    assert _steps(last) == 6
    point = find_resume_checkpoint(run_dir)
    assert point is not None and (point.epoch, point.global_step) == (0, 6)
    again = run_train(args, cwd=tmp_path)
    assert "Resuming from checkpoints/epoch_000.ckpt (epoch 0, step 6)" in again.stderr, again.stderr[-2000:]
    assert not list(checkpoints.glob(".*.tmp-*")), "the rerun leaves no partial write behind"
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["epochs"] == 4


@pytest.mark.slow
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


@pytest.mark.slow
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


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    children = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis.
            if int(stat_file.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat_file.parent.name))
    return children


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_the_ddp_spawn_launcher_stops_its_workers_with_a_checkpoint(tmp_path: Path) -> None:
    """SIGKILL of the launching process (no handler can forward it): torch's spawn asked the kernel for SIGINT to
    its workers when their parent dies (PR_SET_PDEATHSIG), so they stop at a batch boundary with stopped.ckpt
    instead of training on as orphans in the run directory."""
    run_dir = tmp_path / "run"
    marker = tmp_path / "marker"
    args = [*LONGER, "trainer=ddp_cpu", "data.batch_size=4", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "ATTENT_DATA_DIR": str(tmp_path / "data"), "ATTENT_LOG_DIR": str(tmp_path / "out")}
    with (tmp_path / "out.txt").open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args, *_sabotage("marker", 5, marker)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), (tmp_path / "out.txt").read_text()[-3000:]
    workers = [
        pid for pid in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(workers) == 2, workers
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.time() + 120
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "the workers outlived their killed launcher by 120 s"
    assert _steps(run_dir / "checkpoints" / "stopped.ckpt") >= 6
    assert read_summary(run_dir)["status"] == "stopped"
    assert (tmp_path / "out.txt").read_text().count(
        "Received SIGINT: stopping after the batch in flight"
    ) == 2


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    from attent_vision.runs.checkpointing import atomic_torch_save, remove_partial_writes

    ckpts = tmp_path / "checkpoints"
    atomic_torch_save({"state_dict": {}, "epoch": 4, "global_step": 23}, ckpts / "epoch_004.ckpt")
    (ckpts / ".epoch_005.ckpt.tmp-123").write_bytes(b"PK\x03\x04 half a zip")  # a kill during a write
    (ckpts / "last.ckpt").symlink_to("epoch_004.ckpt")
    point = find_resume_checkpoint(tmp_path)
    assert point is not None and (point.epoch, point.global_step) == (4, 23)
    assert [p.name for p in remove_partial_writes(tmp_path)] == [".epoch_005.ckpt.tmp-123"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_004.ckpt", "last.ckpt"]
