"""What ``finetune.py`` does: build the data, model and trainer, load pretrained weights, fine-tune, summarise."""

from __future__ import annotations

import fcntl
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from attent_vision.config import ConfigError, validate_finetune_config
from attent_vision.models.checkpoint import (
    LoadReport,
    MissingEncoderWeightsError,
    load_pretrained,
    resolve_checkpoint,
)
from attent_vision.run import (
    build_trainer,
    check_data,
    count_parameters,
    ending_of,
    finish_wandb_run,
    instantiate_group,
    prepare_resume,
    resume_checkpoint,
)
from attent_vision.tasks.callbacks import FinetuneSummary, run_callbacks

log = logging.getLogger(__name__)


def pretraining_run_dir(source: str | Path) -> Path | None:
    """The train.py run directory behind ``pretrained=``: the directory itself, or the run of a checkpoint in it."""
    path = Path(source)
    candidates = (
        [path] if path.is_dir() else [path.parent.parent] if path.parent.name == "checkpoints" else []
    )
    for directory in candidates:
        if (directory / "summary.json").is_file() or (directory / ".hydra").is_dir():
            return directory
    return None


@contextmanager
def _locked(path: Path):
    """An exclusive lock beside ``path``: parallel sweep jobs update the same downstream.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record_downstream(run_dir: Path, column: str, value: float, details: dict[str, Any]) -> Path:
    """Merges ``{column: value}`` into ``<run_dir>/downstream.json`` and the run's details into downstream_runs.json."""
    target = run_dir / "downstream.json"
    with _locked(target):
        for name, entry in ((target, value), (run_dir / "downstream_runs.json", details)):
            current = json.loads(name.read_text()) if name.is_file() else {}
            current[column] = entry
            tmp = name.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(current, indent=2) + "\n")
            tmp.replace(name)
    return target


def resolve_pretrained(cfg: DictConfig) -> Path | None:
    """The checkpoint file behind ``pretrained=`` (a run directory resolves to its last checkpoint), or None."""
    if cfg.get("pretrained") is None:
        return None
    try:
        return resolve_checkpoint(str(cfg.pretrained))
    except FileNotFoundError as error:
        raise ConfigError(f"pretrained: {error}") from None


def load_encoder(net: Any, source: Path, output_dir: Path) -> LoadReport:
    """Loads the pretrained encoder into ``net``, writing ``<output_dir>/load_report.json``."""
    try:
        report = load_pretrained(net, source, report_path=output_dir / "load_report.json")
    except MissingEncoderWeightsError as error:
        raise ConfigError(f"pretrained: {error}") from None
    log.info("pretrained weights: %s (details in load_report.json)", report.summary())
    return report


def _settings(cfg: DictConfig) -> dict[str, Any]:
    data = cfg.data
    return {
        "task": cfg.task.name,
        "encoder": cfg.encoder.size,
        "patch_size": cfg.encoder.patch_size,
        "inputs": list(cfg.module.net.in_domains),
        "data_root": str(data.root),
        "embedded_data": data.get("synthetic") is not None,
        "input_size": data.input_size,
        "batch_size": data.batch_size,
        "max_epochs": cfg.trainer.max_epochs,
        "lr": cfg.module.get("lr"),
        "blr": cfg.module.get("blr"),
        "layer_decay": cfg.module.get("layer_decay"),
        "seed": cfg.seed,
        "pretrained": cfg.get("pretrained"),
    }


def _print_result(
    task: str, main: str, values: dict[str, float], chance: dict[str, Any], wall: float
) -> None:
    shown = ", ".join(f"{k} {v:.2f}" for k, v in values.items() if isinstance(v, int | float))
    print(f"{task}: {shown}  ({wall:.1f} s)", flush=True)
    if main in chance:
        print(f"  chance level of {main}: {chance[main]:.2f} ({chance['how']})", flush=True)


def run_finetuning(cfg: DictConfig) -> float | None:
    """Fine-tune (or evaluate, or probe with ``probe=knn|linear``) as configured; returns the final value of the
    task's main metric."""
    validate_finetune_config(cfg)
    if cfg.get("probe") is not None:
        from attent_vision.tasks.probe_run import run_probe  # it imports this module's helpers

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
        "settings": _settings(cfg),
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
    _print_result(cfg.task.name, main, final, chance, summary.get("wall_time_s") or 0.0)
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
