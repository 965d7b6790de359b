"""finetune.py end to end, as a user runs it: each task from scratch, pretraining → fine-tuning → report, the sweep
tool, DDP evaluation, and the errors a user sees for bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from attent_vision.config import ConfigError
from attent_vision.data.modalities import DataFormatError
from attent_vision.models.checkpoint import multimae_to_timm_vit, normalize_state_dict, resolve_checkpoint
from attent_vision.run_finetune import run_finetuning

from .conftest import (
    FINETUNE_COMMON,
    FINETUNE_TINY,
    ROOT,
    SHARED_TINY,
    TINY_OVERRIDES,
    run_finetune,
    run_train,
)

MAIN_METRIC = {"cls": "top1", "semseg": "mIoU", "depth": "delta1"}
ALL_METRICS = {
    "cls": {"top1", "top5"},
    "semseg": {"mIoU", "mAcc", "aAcc"},
    "depth": {"delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10"},
}


def _runs(cwd: Path) -> list[Path]:
    return sorted((cwd / "outputs" / "finetune").glob("*runs/**/summary.json"))


@pytest.mark.parametrize("task", ["cls", "semseg", "depth"])
def test_each_task_from_scratch(task: str, tmp_path: Path) -> None:
    proc = run_finetune([*FINETUNE_TINY[task], *FINETUNE_COMMON], cwd=tmp_path)
    (summary_path,) = _runs(tmp_path)
    run = summary_path.parent
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "finished" and summary["task"] == task
    assert summary["metrics"]["main"] == MAIN_METRIC[task]
    assert set(summary["metrics"]["final"]) == ALL_METRICS[task]
    assert set(summary["metrics"]["best"]) == ALL_METRICS[task]
    assert len(summary["history"]) == 2 and summary["wall_time_s"] > 0
    assert summary["pretrained_checkpoint"] is None and summary["settings"]["embedded_data"] is True
    main = MAIN_METRIC[task]
    best = max(h[main] for h in summary["history"])
    assert summary["metrics"]["best"][main] == best
    assert summary["metrics"]["final"][main] == summary["history"][-1][main]
    # The result and its chance level are printed together.
    assert f"chance level of {main}: {summary['chance'][main]:.2f}" in proc.stdout
    assert (run / "predictions" / "epoch_000.png").is_file() and (
        run / "predictions" / "epoch_001.png"
    ).is_file()
    assert (run / "confusion_matrix.png").is_file() == (task == "semseg")
    assert (run / "checkpoints" / "last.ckpt").is_file()
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert f"val/{main}" in header and "train/loss_epoch" in header


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny train.py run (the smoke preset: micro encoder, patch 8, 32 px) and its working directory."""
    cwd = tmp_path_factory.mktemp("pretrain")
    run_train([*TINY_OVERRIDES, "hydra.run.dir=outputs/pretrain/runs/smoke"], cwd=cwd)
    return cwd, cwd / "outputs" / "pretrain" / "runs" / "smoke"


def test_pretrain_then_finetune_all_tasks_feeds_the_report(pretrained_run: tuple[Path, Path]) -> None:
    cwd, run_dir = pretrained_run
    # The command of the README: one multirun over the three tasks from a train.py run directory.
    run_finetune(
        ["-m", "task=cls,semseg,depth", f"pretrained={run_dir}", *SHARED_TINY, *FINETUNE_COMMON], cwd=cwd
    )
    downstream = json.loads((run_dir / "downstream.json").read_text())
    assert set(downstream) == {"ImageNetS50", "NYUv2(S)", "NYUv2(D)"}
    details = json.loads((run_dir / "downstream_runs.json").read_text())
    for column, task in (("ImageNetS50", "cls"), ("NYUv2(S)", "semseg"), ("NYUv2(D)", "depth")):
        finetune_dir = Path(details[column]["finetune_run"])
        summary = json.loads((finetune_dir / "summary.json").read_text())
        assert downstream[column] == summary["metrics"]["final"][MAIN_METRIC[task]]
        report = json.loads((finetune_dir / "load_report.json").read_text())
        # Every encoder weight came from the checkpoint; only the new head is missing; decoders were skipped.
        assert report["format"] == "lightning"
        assert report["missing"] and all(k.startswith(f"output_adapters.{task}.") for k in report["missing"])
        assert any(k.startswith("encoder.") for k in report["loaded"]) and "global_tokens" in report["loaded"]
        assert any(k.startswith("output_adapters.") for k in report["skipped"])
        checkpoint = torch.load(resolve_checkpoint(run_dir), map_location="cpu", weights_only=True)
        pretrained = normalize_state_dict(checkpoint)
        tuned = normalize_state_dict(
            torch.load(finetune_dir / "checkpoints" / "last.ckpt", weights_only=True)
        )
        # Fine-tuning moved the encoder away from (but started at) the pretrained weights.
        assert set(k for k in tuned if k.startswith("encoder.")) <= set(pretrained)
    report = subprocess.run(
        [sys.executable, "-m", "attent_vision.tools.report", str(run_dir.parent)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    header = next(line for line in report.stdout.splitlines() if line.startswith("|"))
    assert "ImageNetS50" in header and "NYUv2(S)" in header and "NYUv2(D)" in header


def test_multirun_over_tasks_and_the_sweep_tool(pretrained_run: tuple[Path, Path]) -> None:
    cwd, run_dir = pretrained_run
    sweep = cwd / "outputs" / "ft_sweep"
    common = [*SHARED_TINY, *FINETUNE_COMMON, f"hydra.sweep.dir={sweep}"]
    dry = subprocess.run(
        [sys.executable, "-m", "attent_vision.tools.finetune_sweep", str(run_dir.parent), "--tasks", "cls", "--dry-run",
         "--force", "--", *common],
        cwd=cwd, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert (
        "1 pretraining run(s) found" in dry.stdout and "task=cls" in dry.stdout and f"{run_dir}" in dry.stdout
    )
    proc = subprocess.run(
        [sys.executable, "-m", "attent_vision.tools.finetune_sweep", str(run_dir.parent), "--tasks", "cls,depth",
         "--force", "--", *common],
        cwd=cwd, capture_output=True, text=True,
        env={**__import__("os").environ, "ATTENT_DATA_DIR": str(cwd / "data"), "ATTENT_LOG_DIR": str(cwd / "outputs")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = sorted(sweep.rglob("summary.json"))
    assert {json.loads(p.read_text())["task"] for p in summaries} == {"cls", "depth"}
    details = json.loads((run_dir / "downstream_runs.json").read_text())
    assert (
        str(sweep) in details["ImageNetS50"]["finetune_run"]
        and str(sweep) in details["NYUv2(D)"]["finetune_run"]
    )
    again = subprocess.run(
        [sys.executable, "-m", "attent_vision.tools.finetune_sweep", str(run_dir.parent), "--tasks", "cls", "--", *common],
        cwd=cwd, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "already has ImageNetS50" in again.stdout


def test_timm_vit_weights_load_through_the_cli(pretrained_run: tuple[Path, Path], tmp_path: Path) -> None:
    cwd, run_dir = pretrained_run
    state = normalize_state_dict(
        torch.load(resolve_checkpoint(run_dir), map_location="cpu", weights_only=True)
    )
    torch.save(multimae_to_timm_vit(state), tmp_path / "vit_micro.pth")
    run_finetune([*FINETUNE_TINY["cls"], *FINETUNE_COMMON, f"pretrained={tmp_path / 'vit_micro.pth'}",
                  "trainer.max_epochs=1", "hydra.run.dir=outputs/ft_timm"], cwd=cwd)  # fmt: skip
    report = json.loads((cwd / "outputs" / "ft_timm" / "load_report.json").read_text())
    assert report["format"] == "timm" and "encoder.0.attn.qkv.weight" in report["loaded"]


def test_eval_only_under_ddp_counts_every_sample_once(pretrained_run: tuple[Path, Path]) -> None:
    cwd, run_dir = pretrained_run
    values = {}
    for trainer in ("cpu", "ddp_cpu"):
        out = f"outputs/eval_{trainer}"
        run_finetune(
            [*FINETUNE_TINY["semseg"], *FINETUNE_COMMON, "data.synthetic.num_eval=9", "data.eval_batch_size=2",
             f"trainer={trainer}", "eval_only=true", f"pretrained={run_dir}", f"hydra.run.dir={out}"],
            cwd=cwd, timeout=400,
        )  # fmt: skip
        summary = json.loads((cwd / out / "summary.json").read_text())
        assert summary["status"] == "evaluated"
        values[trainer] = summary["metrics"]["final"]
    # 9 images on 2 ranks: 5 + 4, nothing padded; the dataset-level metrics equal the single-process ones.
    for name in ("mIoU", "mAcc", "aAcc"):
        assert values["ddp_cpu"][name] == pytest.approx(values["cpu"][name], abs=1e-4)


def test_user_errors_are_one_message(pretrained_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, run_dir = pretrained_run
    # Through the command line: exit status and one message, no traceback.
    for extra, needle in (
        (["pretrained=/does/not/exist"], "pretrained:"),
        (["encoder=tiny", f"pretrained={run_dir}"], "micro (width 128, 4 blocks)"),
    ):
        proc = run_finetune([*FINETUNE_TINY["cls"], *FINETUNE_COMMON, *extra], cwd=tmp_path, check=False)
        assert proc.returncode != 0, extra
        assert needle in proc.stderr, (extra, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (extra, proc.stderr[-3000:])


@pytest.mark.parametrize(
    ("extra", "error", "needle"),
    [
        (["module.layer_decay=2"], ConfigError, "module.layer_decay"),
        (["data.batch_size=7"], ConfigError, "batch size must be even"),
        (["data.input_size=30"], ConfigError, "data.input_size"),
        (["module.net.in_domains=[rgb,semseg]"], ConfigError, "module.net.in_domains"),
        (["eval_only=true"], ConfigError, "eval_only"),
        (["data.synthetic=null", "data.root=/nowhere"], ConfigError, "data.root"),
        (["data.num_classes=5"], DataFormatError, "data.num_classes=5"),
    ],
)
def test_bad_values_fail_before_training(compose_finetune, extra, error, needle) -> None:
    cfg = compose_finetune(*FINETUNE_TINY["cls"], *FINETUNE_COMMON, *extra)
    with pytest.raises(error, match=re.escape(needle)):
        run_finetuning(cfg)


@pytest.mark.parametrize("preset", ["ft_imagenet_s50_cls", "ft_nyuv2_semseg", "ft_nyuv2_depth"])
def test_reference_recipes_compose(compose_finetune, preset: str) -> None:
    cfg = compose_finetune(f"experiment={preset}", "data.root=/data")
    expected = {
        "ft_imagenet_s50_cls": ("cls", 50, 224, 0.65, 100),
        "ft_nyuv2_semseg": ("semseg", 40, 640, 0.75, 200),
        "ft_nyuv2_depth": ("depth", 40, 256, 0.75, 2000),
    }[preset]
    got = (
        cfg.task.name,
        cfg.data.num_classes,
        cfg.data.input_size,
        cfg.module.layer_decay,
        cfg.trainer.max_epochs,
    )
    assert got == expected and cfg.encoder.size == "base" and cfg.data.synthetic is None
    net = OmegaConf.to_container(cfg.module.net, resolve=True)
    assert net["patch_size"] == 16 and net["image_size"] == expected[2]
    if preset == "ft_imagenet_s50_cls":  # the real 50-way head, mixup/cutmix and smoothing of the reference
        assert (
            net["heads"]["cls"]["num_classes"] == 50
            and cfg.module.mixup == 0.8
            and cfg.module.smoothing == 0.1
        )
    if preset == "ft_nyuv2_depth":
        assert cfg.module.loss_type == "berhu" and cfg.trainer.precision == "32-true"


def test_help_lists_the_tasks() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "finetune.py"), "--help"], capture_output=True, text=True, check=True
    )
    assert "finetune.py" in proc.stdout and "task: cls, depth, semseg" in proc.stdout


def test_prepared_nyuv2_files_fine_tune_with_rgbd_input(tmp_path: Path) -> None:
    """Official-format NYUv2 files → `prepare nyuv2` → finetune.py on that layout (40 classes, 0 = unlabeled)."""
    from .test_prepare import _nyu_files

    rng = np.random.default_rng(0)
    source = {
        "images": rng.integers(0, 256, size=(6, 24, 32, 3), dtype=np.uint8),
        "depths": rng.uniform(0.5, 9.0, size=(6, 24, 32)),
        "labels": rng.integers(0, 6, size=(6, 24, 32)).astype(np.uint16),
    }
    labeled, splits, mapping = _nyu_files(tmp_path, source)
    out = tmp_path / "nyu"
    subprocess.run(
        [sys.executable, "-m", "attent_vision.data.prepare", "nyuv2", "--labeled", str(labeled), "--splits",
         str(splits), "--mapping", str(mapping), "--out", str(out), "--no-progress"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    real = ["data.synthetic=null", f"data.root={out}", "data.num_classes=40", "data.batch_size=2"]
    run_finetune(["task=semseg", *real, *FINETUNE_COMMON, "module.net.in_domains=[rgb,depth]",
                  "hydra.run.dir=outputs/rgbd"], cwd=tmp_path)  # fmt: skip
    summary = json.loads((tmp_path / "outputs" / "rgbd" / "summary.json").read_text())
    assert summary["settings"]["inputs"] == ["rgb", "depth"] and summary["settings"]["embedded_data"] is False
    assert 0 <= summary["metrics"]["final"]["mIoU"] <= 100
    run_finetune(["task=depth", *real, *FINETUNE_COMMON, "hydra.run.dir=outputs/depth"], cwd=tmp_path)
    summary = json.loads((tmp_path / "outputs" / "depth" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["chance"]["delta1"] > 0


def test_pictures_reach_tensorboard_and_wandb(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_finetune([*FINETUNE_TINY["semseg"], *FINETUNE_COMMON, "logger=many", "trainer.max_epochs=1",
                  "hydra.run.dir=outputs/pictures"], cwd=tmp_path)  # fmt: skip
    run = tmp_path / "outputs" / "pictures"
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"val/predictions", "val/confusion_matrix"} <= set(events.Tags()["images"])
    media = {p.name.split("_")[0] for p in (run / "wandb").glob("offline-run-*/files/media/images/val/*.png")}
    assert media == {"predictions", "confusion"}, media
