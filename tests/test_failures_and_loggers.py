"""Bad input and bad numbers stop a run with a clear message; every logger works without an account."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from attent_vision.data.synthetic import ensure_synthetic_dataset
from tests.conftest import TINY_OVERRIDES, read_summary, run_train


def test_nan_loss_raises_a_clear_error(compose_cfg):
    cfg = compose_cfg("experiment=smoke")
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    batch = {
        "rgb": torch.full((2, 3, 32, 32), float("nan")),
        "depth": torch.rand(2, 1, 32, 32),
        "semseg": torch.randint(0, 8, (2, 8, 8)),
        "index": torch.arange(2),
    }
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at global step 0 .*rgb=nan"):
        module.training_step(batch, 0)


@pytest.mark.slow
def test_a_corrupt_depth_map_stops_the_run_naming_the_file(tmp_path):
    root = tmp_path / "ds"
    ensure_synthetic_dataset(root, num_train=16, num_val=8, image_size=40, max_objects=2, seed=1)
    victim = sorted((root / "val" / "depth").rglob("*.png"))[0]
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8), mode="L").save(victim)  # 8-bit, not 16-bit
    (root / "meta.json").unlink()  # now an ordinary folder dataset
    proc = run_train(
        [
            *TINY_OVERRIDES,
            "data=multitask_folder",
            "data.synthetic=null",
            f"data.root={root}",
            "data.input_size=32",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.num_classes=8",
            "trainer.max_epochs=1",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "DataFormatError" in proc.stderr and str(victim) in proc.stderr
    assert "16-bit" in proc.stderr
    assert "Traceback" not in proc.stderr


def _csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def _tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the run's TensorBoard event files, read with TensorBoard's own reader: tag -> step -> value."""
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep them all
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _wandb_records(offline_run: Path) -> list[dict]:
    """The records of an offline W&B run's ``.wandb`` file, read with wandb's own reader (``wandb leet inspect``).

    wandb 0.31 no longer ships a Python reader of its transaction log (``wandb.sdk.internal.datastore`` is gone);
    its CLI decodes the file into one JSON record per line. An offline run writes no ``wandb-summary.json``.
    """
    (log,) = offline_run.glob("*.wandb")
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def _by_step(items: list[dict], key: str, step_key: str) -> dict[int, float]:
    return {int(float(item[step_key])): float(item[key]) for item in items if item.get(key) not in (None, "")}


@pytest.mark.slow
def test_tensorboard_and_offline_wandb_need_no_account(tmp_path, monkeypatch):
    env_home = tmp_path / "home"
    env_home.mkdir()
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(env_home))  # no ~/.netrc: not logged in
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(env_home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [a for a in TINY_OVERRIDES if not a.startswith("logger")]
    run_train([*args, "logger=many", "hydra.run.dir=run"], cwd=tmp_path, env_overrides={"WANDB_MODE": None})
    run_dir = tmp_path / "run"
    summary = read_summary(run_dir)
    assert summary["status"] == "finished"
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1, list(run_dir.iterdir())

    # What the run logged, from the CSV logger and summary.json: the loss of every logged step, then per epoch.
    csv_step_loss = _by_step(_csv_rows(run_dir), "train/loss_step", "step")
    assert len(csv_step_loss) >= 2, csv_step_loss
    epoch_losses = [h["train_loss"] for h in summary["history"]]
    assert len(epoch_losses) == summary["epochs"] == 2

    # TensorBoard holds the same values at the same steps (float32 both ways, hence the tight tolerance).
    scalars = _tensorboard_scalars(run_dir)
    assert scalars["train/loss_step"] == pytest.approx(csv_step_loss, rel=1e-6)
    tb_epochs = scalars["train/loss_epoch"]
    assert [tb_epochs[step] for step in sorted(tb_epochs)] == pytest.approx(epoch_losses, rel=1e-6)
    tb_val = scalars["val/loss"]
    assert tb_val[max(tb_val)] == pytest.approx(summary["final_val_loss"], rel=1e-6)

    # So does the offline W&B run's history, keyed by Lightning's trainer/global_step.
    records = _wandb_records(offline_runs[0])
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    assert _by_step(history, "train/loss_step", "trainer/global_step") == pytest.approx(
        csv_step_loss, rel=1e-6
    )
    wandb_epochs = _by_step(history, "train/loss_epoch", "trainer/global_step")
    assert [wandb_epochs[step] for step in sorted(wandb_epochs)] == pytest.approx(epoch_losses, rel=1e-6)
    wandb_val = [item["val/loss"] for item in history if "val/loss" in item]
    assert wandb_val and wandb_val[-1] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    (exit_record,) = [r["exit"] for r in records if r.get("type") == "exit"]
    assert exit_record.get("exit_code", 0) == 0  # the run was closed as a success, not left crashed
