"""Bad input and bad numbers stop a run with a clear message; every logger works without an account."""

import hydra
import numpy as np
import pytest
import torch
from PIL import Image

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
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs, list(run_dir.iterdir())
    assert list(offline_runs[0].glob("*.wandb"))
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert read_summary(run_dir)["status"] == "finished"
