"""What ``finetune.py`` does: build the data, model and trainer, load pretrained weights, fine-tune, summarise."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from attent_vision.config import ConfigError, validate_finetune_config
from attent_vision.runs.callbacks import run_callbacks
from attent_vision.runs.downstream import (
    load_encoder,
    pretraining_run_dir,
    print_result,
    record_downstream,
    resolve_pretrained,
    run_settings,
)
from attent_vision.runs.endings import ending_of
from attent_vision.runs.kit import (
    build_trainer,
    check_data,
    count_parameters,
    finish_wandb_run,
    instantiate_group,
    prepare_resume,
    resume_checkpoint,
)
from attent_vision.runs.probe import run_probe
from attent_vision.runs.summary import FinetuneSummary
from attent_vision.selection.plan import check_accumulation

log = logging.getLogger(__name__)


def run_finetuning(cfg: DictConfig) -> float | None:
    """Fine-tune (or evaluate, or probe with ``probe=knn|linear``) as configured; returns the final value of the
    task's main metric."""
    validate_finetune_config(cfg)
    try:
        check_accumulation(cfg.trainer.get("accumulate_grad_batches", 1))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.get("probe") is not None:
        return run_probe(cfg)
    source = resolve_pretrained(cfg)
    resume_from = None if cfg.get("eval_only") else resume_checkpoint(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    check_data(cfg, datamodule, min_size=int(cfg.encoder.patch_size))
    datamodule.setup("fit")
    module = hydra.utils.instantiate(cfg.module, _convert_="all")
    report = None
    if source is not None and resume_from is None:
        report = load_encoder(module.net, source, output_dir)
    elif resume_from is None:
        log.info("no pretrained weights: training from scratch")
    chance = module.chance_metrics(datamodule)

    # summary.json is written whatever the callbacks group holds (callbacks=none included).
    callbacks, summary_cb = run_callbacks(
        instantiate_group(cfg.get("callbacks")), FinetuneSummary, output_dir=str(output_dir)
    )
    loggers = instantiate_group(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)
    prepare_resume(resume_from, summary_cb, trainer.loggers)
    sizes = count_parameters(module.net)
    fields = {
        "task": cfg.task.name,
        "chance": chance,
        "settings": run_settings(cfg),
        "pretrained_checkpoint": str(source) if source else None,
        "load_report": report.counts() if report is not None else None,
        **sizes,
    }
    summary_cb.update(**fields)
    for logger in trainer.loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True), **sizes})
    log.info(
        "%s on a %s encoder, %.2f M parameters", cfg.task.name, cfg.encoder.size, sizes["params_total"] / 1e6
    )

    try:
        if cfg.get("eval_only"):
            results = trainer.validate(
                module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), verbose=False
            )
            values = {k.removeprefix("val/"): float(v) for k, v in (results[0] if results else {}).items()}
            final = values
            summary = {
                "status": "evaluated",
                "metrics": {"main": module.main_metric, "final": values},
                **fields,
            }
            if trainer.is_global_zero:
                (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        else:
            try:
                trainer.fit(
                    module, datamodule=datamodule, ckpt_path=str(resume_from.path) if resume_from else None
                )
            except BaseException as error:
                raise ending_of(error, cfg) from error
            summary_path = output_dir / "summary.json"
            if not trainer.is_global_zero or not summary_path.is_file():
                return None
            summary = json.loads(summary_path.read_text())
            final = summary["metrics"]["final"]
    finally:
        finish_wandb_run()
    if not trainer.is_global_zero:
        return None

    main = module.main_metric
    value = final.get(main)
    print_result(cfg.task.name, main, final, chance, summary.get("wall_time_s") or 0.0)
    run_dir = pretraining_run_dir(cfg.pretrained) if cfg.get("pretrained") else None
    if value is not None and run_dir is not None and cfg.get("write_downstream") and not cfg.get("eval_only"):
        details = {
            "value": value,
            "metric": main,
            "metrics": final,
            "chance": chance.get(main),
            "finetune_run": str(output_dir),
            "wall_time_s": summary.get("wall_time_s"),
        }
        path = record_downstream(run_dir, str(cfg.task.report_column), value, details)
        print(f"  {cfg.task.report_column} = {value:.2f} recorded in {path}", flush=True)
    return value
