"""What ``train.py`` does: compose the objects from the config, fit, and summarise."""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.errors import InstantiationException
from lightning.pytorch.accelerators import CPUAccelerator
from omegaconf import DictConfig, OmegaConf

from attent_vision.config import ConfigError, cpu_has_native_bf16, validate_pretrain_config
from attent_vision.data.validate import clean_worker_error
from attent_vision.selection import AtteNTTeacher, EpochPlan
from attent_vision.tasks.callbacks import RunSummary, run_callbacks
from attent_vision.tasks.checkpointing import (
    AsyncAtomicCheckpointIO,
    AtomicCheckpointIO,
    NoLoadableCheckpointError,
    ResumePoint,
    find_resume_checkpoint,
    find_resume_checkpoint_file,
    remove_partial_writes,
    set_aside_checkpoints,
)
from attent_vision.tasks.loggers import ResumableCSVLogger, truncate_metrics
from attent_vision.tasks.stops import (
    GracefulStop,
    RunStopped,
    forward_signals_to_workers,
    restore_signal_handlers,
)

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


class RunEnded(Exception):
    """How a run that did not finish ended: a one-paragraph message and the process's exit status."""

    def __init__(self, message: str, exit_code: int, *, requeue: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.requeue = requeue


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


def _chain(error: BaseException | None) -> list[BaseException]:
    """The exception and the ones it was raised from or during."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def ending_of(error: BaseException, cfg: DictConfig) -> RunEnded:
    """Turns an exception out of ``trainer.fit`` into a message and an exit status, from what the run recorded."""
    run_dir = Path(cfg.paths.output_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    status = summary.get("status", "failed")
    stop = summary.get("stop") or {}
    stopped = next((e for e in _chain(error) if isinstance(e, RunStopped)), None)
    if stopped is not None and status not in ("stopped", "requeued"):
        # Only rank 0 writes summary.json; another rank (or rank 0 before the write) knows the stop from the
        # exception itself.
        status = "requeued" if stopped.requeue else "stopped"
        stop = {"signal": signal.Signals(stopped.signum).name, "checkpoint": stopped.checkpoint, **stop}
    where = f"epoch {summary.get('epochs', '?')}, step {summary.get('optimizer_steps', '?')}"
    rerun = f"re-running the same command with hydra.run.dir={run_dir} resumes from it"
    try:
        last_good = find_resume_checkpoint(run_dir)
    except NoLoadableCheckpointError:
        last_good = None
    if status in ("stopped", "requeued"):
        name = stop.get("signal", "a signal")
        signum = getattr(signal, name, signal.SIGTERM)
        saved = stop.get("checkpoint")
        if status == "requeued":
            state = (
                f"the state is saved in {saved}, and the requeued job resumes from it"
                if saved
                else ("nothing was trained yet (no checkpoint), and the requeued job starts afresh")
            )
            return RunEnded(
                f"Stopped by {name} for a requeue at {where}: {state} in {run_dir}.", 0, requeue=True
            )
        state = (
            f"The state is saved in {saved}; {rerun}"
            if saved
            else (
                "Nothing was trained yet, so no checkpoint was written; re-running the command starts afresh"
            )
        )
        return RunEnded(
            f"Stopped by {name} at {where}. {state}. (SLURM sends SIGTERM when a job reaches its time limit: raise "
            "the time, or let jobs requeue, see 'Run on a cluster' in the README.)",
            128 + int(signum),
        )
    error_text = summary.get("error") or f"{type(error).__name__}: {error}"
    if "DataFormatError" in f"{type(error).__name__} {error} {error_text}":
        # A file that went bad after the start-up check, or a loader worker's error: name the file, nothing else.
        saved = stop.get("checkpoint")
        state = f" The state is saved in {saved}; {rerun}." if saved else ""
        return RunEnded(
            f"A data file failed to load at {where}: {clean_worker_error(error)}. Fix or remove it.{state}", 1
        )
    if status == "diverged":
        good = (
            f"The last good checkpoint is {last_good.describe(run_dir)}; {rerun}, with its learning rate."
            if last_good is not None
            else "No checkpoint was written before that, so there is nothing to resume."
        )
        return RunEnded(
            f"The training loss became non-finite at {where} ({error_text.split(': ', 1)[-1].split('. ')[0]}). "
            f"The diverged state is kept apart in {stop.get('checkpoint')} and is never resumed from. {good} "
            f"To train differently, lower model.blr (now {cfg.model.get('blr') if 'model' in cfg else '?'}) or set "
            "trainer.gradient_clip_val=1.0, and start a fresh run directory (or pass resume=restart), since a "
            "resumed run restores the optimizer's learning rate.",
            1,
        )
    (run_dir / "error.txt").write_text("".join(traceback.format_exception(error)))
    saved = stop.get("checkpoint") or (str(last_good.path) if last_good is not None else None)
    state = (
        f"The state at that moment is saved in {saved}; fix the cause and {rerun}."
        if saved
        else ("Nothing was trained yet, so no checkpoint was written.")
    )
    return RunEnded(
        f"Training failed at {where} with {error_text}. {state} The traceback is in {run_dir / 'error.txt'}.",
        1,
    )


def run_pretraining(cfg: DictConfig) -> float | None:
    """Pretrain as configured; returns the final validation loss (the metric a sweeper would optimise)."""
    validate_pretrain_config(cfg)
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
        RunSummary,
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
