"""finetune.py end to end, as a user runs it: each task from scratch, pretraining → fine-tuning → report, the sweep
tool, stop and resume, DDP evaluation, and the errors a user sees for bad input."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from attent_vision.config import ConfigError
from attent_vision.data.modalities import DataFormatError
from attent_vision.models.checkpoint import load_pretrained, normalize_state_dict, resolve_checkpoint
from attent_vision.models.checkpoint_keys import multimae_to_timm_vit
from attent_vision.runs.finetune import run_finetuning

from .conftest import (
    FINETUNE_COMMON,
    FINETUNE_TINY,
    ROOT,
    SHARED_TINY,
    copy_run,
    read_summary,
    run_finetune,
    shared_run,
)

MAIN_METRIC = {"cls": "top1", "semseg": "mIoU", "depth": "delta1"}
ALL_METRICS = {
    "cls": {"top1", "top5"},
    "semseg": {"mIoU", "mAcc", "aAcc"},
    "depth": {"delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10"},
}


def _runs(cwd: Path) -> list[Path]:
    return sorted((cwd / "outputs" / "finetune").glob("*runs/**/summary.json"))


def _is_encoder_key(key: str) -> bool:
    return key == "global_tokens" or key.startswith(("input_adapters.", "encoder."))


@pytest.mark.slow
def test_each_task_from_scratch_in_one_multirun(tmp_path: Path) -> None:
    # One multirun, one interpreter, for the three tasks (as the README runs them). The jobs share one set of tiny
    # data settings, SHARED_TINY: a sweep applies every other override to every job, and these fit all three tasks
    # (cls's own FINETUNE_TINY values, 48 images in batches of 8, matter to no assertion here).
    proc = run_finetune(["-m", "task=cls,semseg,depth", *SHARED_TINY, *FINETUNE_COMMON], cwd=tmp_path)
    runs = {read_summary(path.parent)["task"]: path.parent for path in _runs(tmp_path)}
    assert sorted(runs) == ["cls", "depth", "semseg"] and len(_runs(tmp_path)) == 3
    for task, run in runs.items():
        summary = read_summary(run)
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
def pretrained_run(
    smoke_run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A private copy of the session's tiny train.py run (``smoke_run``) and a working directory around it.

    Fine-tuning from a run writes downstream.json and downstream_runs.json into that run's directory, which the
    shared run must not get. The tests of this module that do so share this one copy and tolerate each other's
    entries: they write the same columns, from fine-tuning runs with the same settings.
    """
    shared_cwd, shared_dir = smoke_run
    cwd = tmp_path_factory.mktemp("pretrain")
    return cwd, copy_run(shared_dir, cwd / shared_dir.relative_to(shared_cwd))


def test_pretrain_then_finetune_all_tasks_feeds_the_report(
    pretrained_run: tuple[Path, Path], compose_finetune
) -> None:
    cwd, run_dir = pretrained_run
    tiny = [*SHARED_TINY, *FINETUNE_COMMON]
    # The command of the README: one multirun over the three tasks from a train.py run directory.
    run_finetune(["-m", "task=cls,semseg,depth", f"pretrained={run_dir}", *tiny], cwd=cwd)
    downstream = json.loads((run_dir / "downstream.json").read_text())
    assert set(downstream) == {"ImageNetS50", "NYUv2(S)", "NYUv2(D)"}
    details = json.loads((run_dir / "downstream_runs.json").read_text())
    pretrained = normalize_state_dict(
        torch.load(resolve_checkpoint(run_dir), map_location="cpu", weights_only=True)
    )
    for column, task in (("ImageNetS50", "cls"), ("NYUv2(S)", "semseg"), ("NYUv2(D)", "depth")):
        finetune_dir = Path(details[column]["finetune_run"])
        summary = read_summary(finetune_dir)
        assert downstream[column] == summary["metrics"]["final"][MAIN_METRIC[task]]
        report = json.loads((finetune_dir / "load_report.json").read_text())
        # Every encoder weight came from the checkpoint; only the new head is missing; decoders were skipped.
        assert report["format"] == "lightning"
        assert report["missing"] and all(k.startswith(f"output_adapters.{task}.") for k in report["missing"])
        assert any(k.startswith("encoder.") for k in report["loaded"]) and "global_tokens" in report["loaded"]
        assert any(k.startswith("output_adapters.") for k in report["skipped"])

        # Step 0: the job's model, built and loaded here as finetune.py does it (same config, same functions). The
        # load does what the job's did (the same report), and leaves every encoder tensor equal to the checkpoint's.
        cfg = compose_finetune(f"task={task}", f"pretrained={run_dir}", *tiny)
        module = hydra.utils.instantiate(cfg.module, _convert_="all")
        assert load_pretrained(module.net, resolve_checkpoint(str(cfg.pretrained))).to_dict() == report
        start = module.net.state_dict()
        encoder = [key for key in start if _is_encoder_key(key)]
        assert set(encoder) <= set(report["loaded"]) and not report["resized"]
        for key in encoder:
            assert torch.equal(start[key], pretrained[key]), key

        # After training: the job's own last checkpoint. Every trainable encoder tensor moved, the frozen sin-cos
        # positions did not, and no weight moved further than AdamW can carry it in the steps taken (|update| <=
        # about 3 x lr per step; 4 x for margin): so the job itself started from the checkpoint, not from an init.
        tuned = normalize_state_dict(
            torch.load(finetune_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        )
        assert {key for key in tuned if _is_encoder_key(key)} == set(encoder)
        trainable = {name for name, param in module.net.named_parameters() if param.requires_grad}
        settings = summary["settings"]
        peak_lr = settings["lr"] or settings["blr"] * settings["batch_size"] / 256
        reach = 4 * peak_lr * summary["optimizer_steps"]
        moved = [key for key in encoder if not torch.equal(tuned[key], start[key])]
        assert set(moved) == {key for key in encoder if key in trainable}, set(encoder) - set(moved)
        # The sin-cos positions are the one frozen tensor: the check above covers both kinds.
        assert set(encoder) - trainable == {"input_adapters.rgb.pos_emb"}
        for key in encoder:
            distance = float((tuned[key] - pretrained[key]).abs().max())
            assert distance <= reach, (key, distance, reach)
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


def test_timm_vit_weights_load_through_the_cli(smoke_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, run_dir = smoke_run  # only read: the weights come from a converted copy
    state = normalize_state_dict(
        torch.load(resolve_checkpoint(run_dir), map_location="cpu", weights_only=True)
    )
    torch.save(multimae_to_timm_vit(state), tmp_path / "vit_micro.pth")
    run_finetune([*FINETUNE_TINY["cls"], *FINETUNE_COMMON, f"pretrained={tmp_path / 'vit_micro.pth'}",
                  "trainer.max_epochs=1", "hydra.run.dir=outputs/ft_timm"], cwd=tmp_path)  # fmt: skip
    report = json.loads((tmp_path / "outputs" / "ft_timm" / "load_report.json").read_text())
    assert report["format"] == "timm" and "encoder.0.attn.qkv.weight" in report["loaded"]


def test_eval_only_under_ddp_counts_every_sample_once(smoke_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, run_dir = smoke_run  # only read: an evaluation records nothing in the pretraining run
    values = {}
    for trainer in ("cpu", "ddp_cpu"):
        out = f"outputs/eval_{trainer}"
        run_finetune(
            [*FINETUNE_TINY["semseg"], *FINETUNE_COMMON, "data.synthetic.num_eval=9", "data.eval_batch_size=2",
             f"trainer={trainer}", "eval_only=true", f"pretrained={run_dir}", f"hydra.run.dir={out}"],
            cwd=tmp_path, timeout=400,
        )  # fmt: skip
        summary = read_summary(tmp_path / out)
        assert summary["status"] == "evaluated"
        values[trainer] = summary["metrics"]["final"]
    # 9 images on 2 ranks: 5 + 4, nothing padded; the dataset-level metrics equal the single-process ones.
    for name in ("mIoU", "mAcc", "aAcc"):
        assert values["ddp_cpu"][name] == pytest.approx(values["cpu"][name], abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# stop and resume

# cls draws the most randomness (crop, flip, RandAugment, mixup / cutmix, drop path): 6 steps per epoch, 2 epochs.
RESUME_ARGS = [*FINETUNE_TINY["cls"], *FINETUNE_COMMON, "trainer.deterministic=true"]
# The signal arrives after step 8; the stop handler checkpoints after step 9 (epoch 1, batch 3 of 6).
STOP_AFTER_STEP = 8


def _sigterm_at(step: int, marker: Path) -> list[str]:
    """Sends the run SIGTERM after optimizer step ``step``, once per ``marker`` (a re-run does not stop again)."""
    return [
        "+callbacks.sabotage._target_=tests.sabotage.Sabotage",
        f"+callbacks.sabotage.at_step={step}",
        "+callbacks.sabotage.action=signal:SIGTERM",
        f"+callbacks.sabotage.marker={marker}",
    ]


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two fine-tuning runs of the same command, built once per session: ``outputs/full`` ran through;
    ``outputs/resumed`` was stopped by SIGTERM mid-epoch, then re-run in its directory. ``stop.json`` keeps what
    the stop left (exit status, stderr, the stop checkpoint's step, the summary) before the re-run changed it."""

    def build(cwd: Path) -> None:
        run_finetune([*RESUME_ARGS, "hydra.run.dir=outputs/full"], cwd=cwd)
        run_dir = cwd / "outputs" / "resumed"
        args = [*RESUME_ARGS, f"hydra.run.dir={run_dir}", *_sigterm_at(STOP_AFTER_STEP, cwd / "fired")]
        stopped = run_finetune(args, cwd=cwd, check=False)
        ckpt = run_dir / "checkpoints" / "stopped.ckpt"
        stop = {
            "returncode": stopped.returncode,
            "stderr": stopped.stderr[-4000:],
            "checkpoint_step": torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
            if ckpt.is_file()
            else None,
            "summary": read_summary(run_dir) if (run_dir / "summary.json").is_file() else None,
        }
        (cwd / "stop.json").write_text(json.dumps(stop, indent=2))
        resumed = run_finetune(args, cwd=cwd)
        (cwd / "resumed_stderr.txt").write_text(resumed.stderr)

    return shared_run(tmp_path_factory, "finetune-stop-resume", build)


def test_a_stopped_fine_tuning_resumes_in_its_directory(stopped_and_resumed: Path) -> None:
    cwd = stopped_and_resumed
    stop = json.loads((cwd / "stop.json").read_text())
    assert stop["returncode"] == 143, stop["stderr"]
    assert "Stopped by SIGTERM at epoch 1, step 9" in stop["stderr"] and "Traceback" not in stop["stderr"]
    assert stop["checkpoint_step"] == 9  # the batch in flight finished, then the state was saved
    assert stop["summary"]["status"] == "stopped" and stop["summary"]["stop"]["signal"] == "SIGTERM"
    assert [h["epoch"] for h in stop["summary"]["history"]] == [0]

    resumed_stderr = (cwd / "resumed_stderr.txt").read_text()
    assert "Resuming from checkpoints/stopped.ckpt (epoch 1, step 9)" in resumed_stderr
    run_dir, full_dir = cwd / "outputs" / "resumed", cwd / "outputs" / "full"
    summary, full = read_summary(run_dir), read_summary(full_dir)
    assert summary["status"] == "finished" and summary["restarts"] == 1
    assert [s["status"] for s in summary["sessions"]] == ["stopped", "finished"]
    assert summary["optimizer_steps"] == full["optimizer_steps"] == 12 and summary["epochs"] == 2
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    assert set(summary["metrics"]["final"]) == ALL_METRICS["cls"]
    # Before the stop both runs did the same (deterministic) work: the kept epoch is the uninterrupted run's.
    kept, reference = summary["history"][0], full["history"][0]
    for key in ("optimizer_steps", "train_loss", "val_loss", *ALL_METRICS["cls"]):
        assert kept[key] == reference[key], key
    with (run_dir / "csv" / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))  # appended, not overwritten: every logged step once
    steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) and max(steps) >= 9


def test_a_resumed_fine_tuning_reaches_the_uninterrupted_result(stopped_and_resumed: Path) -> None:
    summary = read_summary(stopped_and_resumed / "outputs" / "resumed")
    full = read_summary(stopped_and_resumed / "outputs" / "full")
    assert summary["status"] == full["status"] == "finished"
    # Every validation after the resume, and the final metrics. (Not the resumed epoch's mean train loss: it averages
    # the batches of the resumed process only.)
    got = [(h["epoch"], h["val_loss"], {m: h[m] for m in ALL_METRICS["cls"]}) for h in summary["history"]]
    want = [(h["epoch"], h["val_loss"], {m: h[m] for m in ALL_METRICS["cls"]}) for h in full["history"]]
    # Exact: the checkpoint holds the global RNG states (crop, flip, RandAugment, mixup, drop path draw from them)
    # and the batches trained, so the resumed epoch trains on the rest of its order with the same draws.
    assert got == want
    assert summary["metrics"]["final"] == full["metrics"]["final"]


# ---------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.slow
def test_user_errors_are_one_message(tmp_path: Path) -> None:
    # Through the command line: exit status and one message, no traceback. (The in-process tests below check the
    # messages of the other bad values; this one is what a user sees.)
    proc = run_finetune(
        [*FINETUNE_TINY["cls"], *FINETUNE_COMMON, "pretrained=/does/not/exist"], cwd=tmp_path, check=False
    )
    assert proc.returncode == 1
    assert "ConfigError: pretrained:" in proc.stderr and "/does/not/exist" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_an_encoder_that_does_not_fit_the_checkpoint_names_both(
    compose_finetune, smoke_run: tuple[Path, Path], tmp_path: Path
) -> None:
    _, run_dir = smoke_run  # only read: the load fails before anything is written
    cfg = compose_finetune(
        *FINETUNE_TINY["cls"], *FINETUNE_COMMON, "encoder=tiny", f"pretrained={run_dir}",
        f"paths.data_dir={tmp_path / 'data'}",
    )  # fmt: skip
    # One message that names the file and both encoders, and how to fix it.
    with pytest.raises(ConfigError) as error:
        run_finetuning(cfg)
    message = str(error.value)
    assert message.startswith(f"pretrained: {resolve_checkpoint(run_dir)}: the checkpoint does not fit"), (
        message
    )
    assert (
        "the checkpoint's encoder is micro (width 128, 4 blocks) but the model is tiny (width 192, 12 blocks): "
        "choose the matching encoder size" in message
    ), message
    assert not (tmp_path / "run" / "summary.json").exists()  # it failed before training


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
def test_bad_values_fail_before_training(compose_finetune, tmp_path: Path, extra, error, needle) -> None:
    # The embedded data goes under tmp_path, not into the launch directory's data/.
    cfg = compose_finetune(
        *FINETUNE_TINY["cls"], *FINETUNE_COMMON, f"paths.data_dir={tmp_path / 'data'}", *extra
    )
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


@pytest.mark.slow
def test_help_lists_the_tasks() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "finetune.py"), "--help"], capture_output=True, text=True, check=True
    )
    assert "finetune.py" in proc.stdout and "task: cls, depth, semseg" in proc.stdout


@pytest.mark.slow
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
    summary = read_summary(tmp_path / "outputs" / "rgbd")
    assert summary["settings"]["inputs"] == ["rgb", "depth"] and summary["settings"]["embedded_data"] is False
    assert 0 <= summary["metrics"]["final"]["mIoU"] <= 100
    run_finetune(["task=depth", *real, *FINETUNE_COMMON, "hydra.run.dir=outputs/depth"], cwd=tmp_path)
    summary = read_summary(tmp_path / "outputs" / "depth")
    assert summary["status"] == "finished" and summary["chance"]["delta1"] > 0


@pytest.mark.slow
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
