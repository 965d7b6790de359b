"""The shared run kit: what a pretraining, fine-tuning or probe run builds the same way (callbacks and loggers from
their config groups, the Trainer with atomic checkpoint writes, the data check, where a run resumes from)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from lightning.pytorch.accelerators import CPUAccelerator
from omegaconf import DictConfig

from attent_vision.config import ConfigError, cpu_has_native_bf16
from attent_vision.runs.checkpointing import (
    AsyncAtomicCheckpointIO,
    AtomicCheckpointIO,
    NoLoadableCheckpointError,
    ResumePoint,
    find_resume_checkpoint,
    find_resume_checkpoint_file,
    remove_partial_writes,
    set_aside_checkpoints,
)
from attent_vision.runs.loggers import ResumableCSVLogger, truncate_metrics
from attent_vision.runs.stops import GracefulStop

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every child with a ``_target_`` (callbacks and loggers are keyed by name)."""
    if not group:
        return []
    return [
        hydra.utils.instantiate(node)
        for node in group.values()
        if isinstance(node, DictConfig) and "_target_" in node
    ]


def count_parameters(module: Any) -> dict[str, int]:
    params = list(module.parameters())
    return {
        "params_total": sum(p.numel() for p in params),
        "params_trainable": sum(p.numel() for p in params if p.requires_grad),
    }


def configured_world_size(trainer_cfg: DictConfig) -> int:
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1) or 1
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, list | tuple):
        return len(devices) * nodes
    return nodes  # "auto" / -1: known only once the trainer starts; the teacher re-plans then


def finish_wandb_run() -> None:
    """Close an active W&B run so the next job of a multirun starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def build_trainer(cfg: DictConfig, callbacks: list[Any], loggers: list[Any]) -> pl.Trainer:
    """The configured Trainer with atomic (by default asynchronous) checkpoint writes added to its plugins."""
    plugins = [hydra.utils.instantiate(p) for p in (cfg.trainer.get("plugins") or [])]
    plugins.append(AsyncAtomicCheckpointIO() if cfg.get("async_checkpoints", True) else AtomicCheckpointIO())
    # The stop handler first: the summary written on an exception then already knows how the run stopped.
    callbacks = sorted(callbacks, key=lambda cb: not isinstance(cb, GracefulStop))
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins
    )
    on_cpu = isinstance(trainer.accelerator, CPUAccelerator)
    if on_cpu and str(trainer.precision).startswith("bf16") and not cpu_has_native_bf16():
        log.warning(
            "trainer.precision=%s on a CPU without native bf16 (no AVX512-BF16, AMX or Arm BF16 flag): autocast is "
            "emulated and much slower than 32-true",
            trainer.precision,
        )
    return trainer


def check_data(cfg: DictConfig, datamodule: Any, *, min_size: int) -> None:
    """Opens every file of the selected splits once, before any training step (``validate_data=false`` skips it).

    Problems are listed together, each naming its file; results are cached by file size and mtime.
    """
    datamodule.prepare_data()  # generates the embedded data if needed (locked: ranks that start together wait)
    if cfg.get("validate_data", True):
        datamodule.validate_files(min_size=min_size)


def resume_checkpoint(cfg: DictConfig) -> ResumePoint | None:
    """What this run resumes from: ``ckpt_path`` when given, else the newest loadable checkpoint of its directory.

    ``resume=restart`` moves the directory's checkpoints aside and starts over; with the default ``resume=auto`` a
    directory whose checkpoints all fail to load is an error, never a silent restart.
    """
    run_dir = Path(cfg.paths.output_dir)
    explicit = cfg.get("ckpt_path")
    mode = str(cfg.get("resume", "auto"))
    if mode not in ("auto", "restart"):
        raise ConfigError(f"resume: {mode!r} is not one of ['auto', 'restart']")
    if explicit is not None:
        try:
            return find_resume_checkpoint_file(Path(str(explicit)))
        except NoLoadableCheckpointError as error:
            raise ConfigError(f"ckpt_path: {error}") from None
    for partial in remove_partial_writes(run_dir):
        log.info("removed %s, the remains of a checkpoint write that was interrupted", partial.name)
    if mode == "restart":
        moved = set_aside_checkpoints(run_dir)
        if moved is not None:
            log.warning("resume=restart: moved the previous checkpoints to %s and starting over", moved)
        return None
    try:
        point = find_resume_checkpoint(run_dir)
    except NoLoadableCheckpointError as error:
        raise ConfigError(f"resume: {error}") from None
    if point is not None:
        log.info("Resuming from %s", point.describe(run_dir))
    return point


def prepare_resume(point: ResumePoint | None, summary_cb: Any, loggers: list[Any]) -> None:
    """Continue the summary and the metrics file of the run being resumed."""
    if point is None:
        return
    if summary_cb is not None:
        summary_cb.resume(str(point.path), point.global_step)
    for logger in loggers:
        if isinstance(logger, ResumableCSVLogger):
            truncate_metrics(Path(logger.log_dir) / "metrics.csv", last_step=point.global_step)
