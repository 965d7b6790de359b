"""What ``train.py`` does: compose the objects from the config, fit, and summarise."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from attent_vision.config import ConfigError, validate_pretrain_config
from attent_vision.runs.callbacks import run_callbacks
from attent_vision.runs.endings import ending_of
from attent_vision.runs.kit import (
    build_trainer,
    check_data,
    configured_world_size,
    count_parameters,
    finish_wandb_run,
    instantiate_group,
    prepare_resume,
    resume_checkpoint,
)
from attent_vision.runs.stops import forward_signals_to_workers, restore_signal_handlers
from attent_vision.runs.summary import PretrainSummary
from attent_vision.selection import AtteNTTeacher, EpochPlan
from attent_vision.selection.plan import check_accumulation

log = logging.getLogger(__name__)


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


def build_teacher(cfg: DictConfig) -> AtteNTTeacher:
    try:
        return hydra.utils.instantiate(cfg.teacher)
    except InstantiationException as error:
        # Hydra wraps the schedules' and teacher's ValueErrors (which name the key); anything else is a bug.
        if isinstance(error.__cause__, ValueError):
            raise ConfigError(str(error.__cause__)) from None
        raise


def plan_from_config(cfg: DictConfig, teacher: AtteNTTeacher, datamodule: Any) -> list[EpochPlan]:
    """The epoch plan the run will follow, computed before any data is generated or model built.

    Its steps are optimizer steps: with ``trainer.accumulate_grad_batches=N`` each is N batches of
    ``data.batch_size`` on every rank.
    """
    try:
        return teacher.make_plan(
            max_epochs=int(cfg.trainer.max_epochs),
            dataset_size=datamodule.train_size(),
            batch_size=int(cfg.data.batch_size),
            world_size=configured_world_size(cfg.trainer),
            accumulate=accumulation(cfg),
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None


def accumulation(cfg: DictConfig) -> int:
    """``trainer.accumulate_grad_batches`` (default 1), checked: a ConfigError unless an integer >= 1."""
    try:
        return check_accumulation(cfg.trainer.get("accumulate_grad_batches", 1))
    except ValueError as error:
        raise ConfigError(str(error)) from None


def run_pretraining(cfg: DictConfig) -> float | None:
    """Pretrain as configured; returns the final validation loss (the metric a sweeper would optimise)."""
    validate_pretrain_config(cfg)
    accumulation(cfg)  # before anything is built: Lightning's own message would not name the key
    teacher = build_teacher(cfg)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    plan = plan_from_config(cfg, teacher, datamodule)
    if cfg.get("print_plan"):
        print(json.dumps([p.as_dict() for p in plan]), flush=True)
        return None
    resume_from = resume_checkpoint(cfg)
    check_data(cfg, datamodule, min_size=int(cfg.model.net.patch_size))

    pl.seed_everything(cfg.seed, workers=True)
    # prepare_data() (generating the synthetic set) is Lightning's job: once per node, before any loader.
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    # summary.json is written whatever the callbacks group holds; the teacher goes after the configured callbacks so
    # per-epoch timings close before it scores for the next epoch.
    callbacks, summary_cb = run_callbacks(
        instantiate_group(cfg.get("callbacks")),
        PretrainSummary,
        output_dir=str(cfg.paths.output_dir),
        last=[teacher],
    )
    loggers = instantiate_group(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)

    prepare_resume(resume_from, summary_cb, trainer.loggers)
    sizes = count_parameters(model.net)
    summary_cb.update(**sizes)
    for logger in trainer.loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True), **sizes})
    log.info("model: %s, %.2f M parameters", cfg.model.net.size, sizes["params_total"] / 1e6)

    if cfg.get("validate_before_training") and resume_from is None:
        # Without loggers: their files then start with the fit (Lightning's CSV logger breaks under ddp_spawn
        # when a second spawn appends to the file the first one wrote); the value goes to summary.json.
        loggers, trainer.loggers = trainer.loggers, []
        try:
            initial = trainer.validate(model, datamodule=datamodule, verbose=False)
        finally:
            trainer.loggers = loggers
        if initial:
            summary_cb.update(initial_val_loss=initial[0].get("val/loss"))

    previous_handlers = forward_signals_to_workers(trainer)
    # A mid-epoch checkpoint resumes that epoch's order, skipping the trained batches (the teacher's sampler
    # keeps its position), so Lightning's warning about non-resumable loaders does not apply.
    warnings.filterwarnings(
        "ignore", message=r".*resuming from a checkpoint that ended before the epoch ended"
    )
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume_from.path) if resume_from else None)
    except BaseException as error:
        raise ending_of(error, cfg) from error
    finally:
        restore_signal_handlers(previous_handlers)
        finish_wandb_run()

    summary_path = Path(cfg.paths.output_dir, "summary.json")
    if not trainer.is_global_zero or not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    print(format_summary(summary), flush=True)
    value = summary.get("final_val_loss")
    return value if value is not None and math.isfinite(value) else None
