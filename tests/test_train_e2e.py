"""train.py end to end in a subprocess, as a user runs it: summary, checkpoints, resume."""

import csv
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_OVERRIDES, copy_run, read_summary, run_train


def only_run_dir(root: Path) -> Path:
    runs = sorted((root / "outputs" / "pretrain" / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_tiny_run_writes_summary_checkpoints_and_metrics(smoke_run):
    """The session's shared smoke run: ``train.py experiment=smoke selection=none logger=csv``."""
    cwd, run_dir = smoke_run
    assert only_run_dir(cwd) == run_dir
    summary = read_summary(run_dir)
    assert summary["status"] == "finished"
    for key in ("wall_time_s", "samples_seen", "optimizer_steps", "final_train_loss", "final_val_loss"):
        assert summary[key] is not None, key
    # 48 train samples, batch 8, drop_last -> 6 steps per epoch, 2 epochs.
    assert summary["optimizer_steps"] == 12
    assert summary["samples_seen"] == 96
    assert summary["epochs"] == 2
    assert set(summary["final_val_losses"]) == {"rgb", "depth", "semseg", "norm_rgb"}
    assert summary["initial_val_loss"] > 0
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    with open(run_dir / "csv" / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert {"train/loss_step", "val/loss", "val/loss_depth", "lr-AdamW/pg1"} <= set(columns)
    assert "run summary (summary.json):" in (cwd / "train.stdout").read_text()
    # the synthetic data went to ATTENT_DATA_DIR, outside the run directory
    assert (cwd / "data" / "synthetic_smoke" / "meta.json").is_file()


def test_resume_from_last_ckpt_continues_the_step_count(smoke_run, tmp_path):
    last = smoke_run[1] / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 12 and state["samples_seen"] == 96
    run_train(
        [*TINY_OVERRIDES, "hydra.run.dir=outputs/resumed", f"ckpt_path={last}", "trainer.max_epochs=3"],
        cwd=tmp_path,
    )
    summary = read_summary(tmp_path / "outputs" / "resumed")
    assert summary["optimizer_steps"] == 18
    assert summary["samples_seen"] == 144
    assert [e["epoch"] for e in summary["history"]] == [2]


def test_rerunning_in_the_same_run_dir_resumes_from_its_newest_checkpoint(smoke_run, tmp_path):
    """A requeued job that lands in its own directory continues instead of starting over."""
    copy_run(
        smoke_run[1], tmp_path / "outputs" / "job"
    )  # a finished 2-epoch run, as the same command left it
    first = read_summary(tmp_path / "outputs" / "job")
    run_train([*TINY_OVERRIDES, "hydra.run.dir=outputs/job", "trainer.max_epochs=3"], cwd=tmp_path)
    summary = read_summary(tmp_path / "outputs" / "job")
    assert summary["optimizer_steps"] == 18
    # the same run directory keeps the whole run's history across restarts (a new directory would start it afresh)
    assert [e["epoch"] for e in summary["history"]] == [0, 1, 2]
    assert summary["restarts"] == 1 and len(summary["sessions"]) == 2
    # no second pre-fit validation on resume: the first session's value stands
    assert summary["initial_val_loss"] == first["initial_val_loss"]


@pytest.mark.slow
def test_validating_every_k_epochs_still_validates_the_last_epoch_and_checkpoints_every_epoch(tmp_path):
    run_train(
        [
            *TINY_OVERRIDES,
            "hydra.run.dir=outputs/sparse",
            "trainer.max_epochs=4",
            "trainer.check_val_every_n_epoch=3",
            "callbacks.model_checkpoint.save_top_k=-1",
        ],
        cwd=tmp_path,
    )
    summary = read_summary(tmp_path / "outputs" / "sparse")
    validated = [h["epoch"] for h in summary["history"] if h.get("val_loss") is not None]
    assert validated == [2, 3]  # epoch 3 is not divisible by the period: validated because it is the last
    assert summary["final_val_loss"] == summary["history"][-1]["val_loss"]
    # checkpoints do not wait for validations: every epoch is resumable
    written = sorted(p.name for p in (tmp_path / "outputs" / "sparse" / "checkpoints").glob("epoch_*.ckpt"))
    assert written == [f"epoch_{e:03d}.ckpt" for e in range(4)]
