"""What ``train.py`` does: compose the objects from the config, fit, and summarise."""

from __future__ import annotations

import logging
import math
from typing import Any

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from attent_vision.config import validate_pretrain_config
from attent_vision.tasks.callbacks import RunSummary

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every child with a ``_target_`` (callbacks and loggers are keyed by name)."""
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def count_parameters(module: Any) -> dict[str, int]:
    params = list(module.parameters())
    return {
        "params_total": sum(p.numel() for p in params),
        "params_trainable": sum(p.numel() for p in params if p.requires_grad),
    }


def format_summary(summary: dict[str, Any]) -> str:
    keys = [
        "status", "wall_time_s", "train_time_s", "epochs", "optimizer_steps", "samples_seen", "train_images_per_s",
        "initial_val_loss", "final_val_loss", "final_train_loss", "scoring_time_s", "checkpoint",
    ]
    width = max(len(k) for k in keys)
    lines = [f"  {k:<{width}}  {summary[k]}" for k in keys if summary.get(k) is not None]
    return "\n".join(["run summary (summary.json):", *lines])


def run_pretraining(cfg: DictConfig) -> float | None:
    """Pretrain as configured; returns the final validation loss (the metric a sweeper would optimise)."""
    validate_pretrain_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()  # generate the synthetic set once, in this process, before any worker starts
    model = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    summary_cb = next((cb for cb in callbacks if isinstance(cb, RunSummary)), None)
    sizes = count_parameters(model.net)
    for logger in trainer.loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True), **sizes})
    log.info("model: %s, %.2f M parameters", cfg.model.net.size, sizes["params_total"] / 1e6)

    if cfg.get("validate_before_training") and cfg.get("ckpt_path") is None:
        initial = trainer.validate(model, datamodule=datamodule, verbose=False)
        if summary_cb is not None and initial:
            summary_cb.update(initial_val_loss=initial[0].get("val/loss"))

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    if summary_cb is None or not trainer.is_global_zero:
        return None
    checkpoint = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
    summary_cb.update(checkpoint=checkpoint or None, **sizes)
    summary = summary_cb.write(trainer, model, "finished")
    print(format_summary(summary), flush=True)
    value = summary.get("final_val_loss")
    return value if value is not None and math.isfinite(value) else None
