"""What ``train.py`` does: compose the objects from the config, fit, and summarise."""

from __future__ import annotations

import json
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from attent_vision.config import ConfigError, validate_pretrain_config
from attent_vision.selection import AtteNTTeacher, EpochPlan
from attent_vision.tasks.callbacks import RunSummary

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


def format_summary(summary: dict[str, Any]) -> str:
    keys = [
        "status",
        "wall_time_s",
        "train_time_s",
        "epochs",
        "optimizer_steps",
        "samples_seen",
        "train_images_per_s",
        "initial_val_loss",
        "final_val_loss",
        "final_train_loss",
        "scoring_time_s",
        "checkpoint",
    ]
    width = max(len(k) for k in keys)
    lines = [f"  {k:<{width}}  {summary[k]}" for k in keys if summary.get(k) is not None]
    return "\n".join(["run summary (summary.json):", *lines])


def configured_world_size(trainer_cfg: DictConfig) -> int:
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1) or 1
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, list | tuple):
        return len(devices) * nodes
    return nodes  # "auto" / -1: known only once the trainer starts; the teacher re-plans then


def build_teacher(cfg: DictConfig) -> AtteNTTeacher:
    try:
        return hydra.utils.instantiate(cfg.teacher)
    except InstantiationException as error:
        # Hydra wraps the schedules' and teacher's ValueErrors (which name the key); anything else is a bug.
        if isinstance(error.__cause__, ValueError):
            raise ConfigError(str(error.__cause__)) from None
        raise


def plan_from_config(cfg: DictConfig, teacher: AtteNTTeacher, datamodule: Any) -> list[EpochPlan]:
    """The epoch plan the run will follow, computed before any data is generated or model built."""
    try:
        return teacher.make_plan(
            max_epochs=int(cfg.trainer.max_epochs),
            dataset_size=datamodule.train_size(),
            batch_size=int(cfg.data.batch_size),
            world_size=configured_world_size(cfg.trainer),
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None


def finish_wandb_run() -> None:
    """Close an active W&B run so the next job of a multirun starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def run_pretraining(cfg: DictConfig) -> float | None:
    """Pretrain as configured; returns the final validation loss (the metric a sweeper would optimise)."""
    validate_pretrain_config(cfg)
    teacher = build_teacher(cfg)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    plan = plan_from_config(cfg, teacher, datamodule)
    if cfg.get("print_plan"):
        print(json.dumps([p.as_dict() for p in plan]), flush=True)
        return None

    pl.seed_everything(cfg.seed, workers=True)
    # prepare_data() (generating the synthetic set) is Lightning's job: once per node, before any loader.
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    # The teacher goes last so per-epoch timings close before it scores for the next epoch.
    callbacks = [*instantiate_group(cfg.get("callbacks")), teacher]
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    summary_cb = next((cb for cb in callbacks if isinstance(cb, RunSummary)), None)
    sizes = count_parameters(model.net)
    if summary_cb is not None:
        summary_cb.update(**sizes)
    for logger in trainer.loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True), **sizes})
    log.info("model: %s, %.2f M parameters", cfg.model.net.size, sizes["params_total"] / 1e6)

    # Skipped when resuming, including the automatic resume of a requeued job from its own run directory
    # (validating first would let the crash-checkpoint callback clean up the very file to resume from).
    run_dir_has_checkpoints = any(Path(cfg.paths.output_dir, "checkpoints").glob("*.ckpt"))
    if cfg.get("validate_before_training") and cfg.get("ckpt_path") is None and not run_dir_has_checkpoints:
        # Without loggers: their files then start with the fit (Lightning's CSV logger breaks under ddp_spawn
        # when a second spawn appends to the file the first one wrote); the value goes to summary.json.
        loggers, trainer.loggers = trainer.loggers, []
        try:
            initial = trainer.validate(model, datamodule=datamodule, verbose=False)
        finally:
            trainer.loggers = loggers
        if summary_cb is not None and initial:
            summary_cb.update(initial_val_loss=initial[0].get("val/loss"))

    with warnings.catch_warnings():
        # With the crash checkpoint configured, Lightning resumes from the run directory's last checkpoint when
        # there is one (a requeued job in the same directory) and warns when, as usual, there is none.
        warnings.filterwarnings("ignore", message=r".*ckpt_path=None\)` was called without a model")
        warnings.filterwarnings("ignore", message=r".*is set, but there is no last checkpoint available")
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        finally:
            finish_wandb_run()

    summary_path = Path(cfg.paths.output_dir, "summary.json")
    if not trainer.is_global_zero or not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    print(format_summary(summary), flush=True)
    value = summary.get("final_val_loss")
    return value if value is not None and math.isfinite(value) else None
