"""Run-level callbacks: the per-run ``summary.json``, and the callbacks every run gets (:func:`run_callbacks`)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from attent_vision.tasks.rng_capture import RngStateCapture

log = logging.getLogger(__name__)


def _metric(trainer: pl.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class RunSummary(pl.Callback):
    """Writes ``summary.json`` into the run directory when fitting ends (or fails).

    It holds wall time, samples and optimizer steps, per-epoch train/val losses and the final ones. Other parts of
    the run add their own fields through :meth:`update` (for example the initial validation loss or the AtteNT
    teacher's scoring time).

    A run that resumes in its directory continues the summary: ``sessions`` lists every process that worked on the
    run (how it ended, its wall time, scoring time and samples), the totals add them up (work redone after a crash
    counts: it cost time), and the history keeps the epochs of the checkpoint it resumed from.

    Args:
        output_dir: Run directory; the file is ``<output_dir>/summary.json``.
    """

    def __init__(self, *, output_dir: str) -> None:
        self.path = Path(output_dir) / "summary.json"
        self.run_start = time.perf_counter()
        self.fit_start: float | None = None
        self.fields: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.previous_sessions: list[dict[str, Any]] = []
        self.resumed_from: str | None = None
        self._resumed_step = 0
        self._epoch_start = 0.0
        self._val_start = 0.0
        self._val_time = 0.0
        self._samples_at_start = 0
        self._scoring_at_start = 0.0

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)

    def resume(self, checkpoint: str, global_step: int) -> None:
        """Continues the summary of the run this process resumes, from a checkpoint at ``global_step``."""
        self.resumed_from = checkpoint
        self._resumed_step = global_step
        try:
            previous = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        self.previous_sessions = previous.get("sessions") or [
            {key: previous.get(key) for key in ("status", "wall_time_s", "scoring_time_s")}
        ]
        self.history = [h for h in previous.get("history", []) if h.get("optimizer_steps", 0) <= global_step]
        if "initial_val_loss" in previous:
            self.fields.setdefault("initial_val_loss", previous["initial_val_loss"])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_start = time.perf_counter()
        # Again at on_train_start; from here for a run stopped before it (during the resume's scoring pass).
        self._samples_at_start = getattr(pl_module, "samples_seen", 0) or 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run resumed mid-epoch skips on_train_epoch_start for that epoch; samples_seen is cumulative.
        self._epoch_start = time.perf_counter()
        self._samples_at_start = getattr(pl_module, "samples_seen", 0) or 0
        self._scoring_at_start = self._scoring_time(trainer)

    def _scoring_time(self, trainer: pl.Trainer) -> float:
        for callback in trainer.callbacks:
            if callback is not self and hasattr(callback, "scoring_time_s"):
                return float(callback.scoring_time_s)
        return 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._val_time = 0.0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._val_time += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs before the teacher prepares the next epoch (run.py puts the teacher last), after validation.
        elapsed = time.perf_counter() - self._epoch_start
        record = {
            "epoch": trainer.current_epoch,
            "train_loss": _metric(trainer, "train/loss_epoch"),
            "train_time_s": round(elapsed - self._val_time, 3),
            "optimizer_steps": trainer.global_step,
            "samples_seen": getattr(pl_module, "samples_seen", None),
        }
        if self._val_time:
            record["val_loss"] = _metric(trainer, "val/loss")
            record["val_time_s"] = round(self._val_time, 3)
        self.history.append(record)

    def _last(self, key: str) -> float | None:
        return next((h[key] for h in reversed(self.history) if h.get(key) is not None), None)

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, status: str) -> dict[str, Any]:
        now = time.perf_counter()
        fit_time = now - self.fit_start if self.fit_start is not None else None
        samples = getattr(pl_module, "samples_seen", None)
        trained_here = (samples or 0) - self._samples_at_start
        train_time = sum(e["train_time_s"] for e in self.history)
        val_time = sum(e.get("val_time_s", 0.0) for e in self.history)
        steps, epochs = trainer.global_step, trainer.current_epoch
        if steps < self._resumed_step:
            # Stopped before Lightning restored its loops (in the resume's scoring pass): nothing moved since the
            # checkpoint, whose completed epochs are those of the history kept.
            steps, epochs = self._resumed_step, len(self.history)
        session = {
            "status": status,
            "resumed_from": self.resumed_from,
            "wall_time_s": round(now - self.run_start, 3),
            "scoring_time_s": round(self._scoring_time(trainer) - self._scoring_at_start, 3),
            "samples_processed": trained_here,
            "optimizer_steps": steps,
        }
        sessions = [*self.previous_sessions, session]
        totals = {
            "wall_time_s": round(sum(s.get("wall_time_s") or 0.0 for s in sessions), 3),
            "scoring_time_s": round(sum(s.get("scoring_time_s") or 0.0 for s in sessions), 3),
            "samples_processed": sum(s.get("samples_processed") or 0 for s in sessions) or None,
            "restarts": len(sessions) - 1,
        }
        return {
            "status": status,
            "wall_time_s": totals["wall_time_s"],
            "fit_time_s": round(fit_time, 3) if fit_time is not None else None,
            "train_time_s": round(train_time, 3),  # training batches only: no validation, no scoring
            "val_time_s": round(val_time, 3),
            "samples_seen": samples,
            "optimizer_steps": steps,
            "epochs": epochs,  # completed epochs (absolute, so a resumed run counts from 0)
            "train_images_per_s": round(trained_here / train_time, 2)
            if trained_here and train_time
            else None,
            # A resumed run with nothing left to train logs no loss: the last recorded epoch's values stand.
            "final_train_loss": _metric(trainer, "train/loss_epoch") or self._last("train_loss"),
            "final_val_loss": _metric(trainer, "val/loss") or self._last("val_loss"),
            "final_val_losses": {
                k.removeprefix("val/loss_"): float(v)
                for k, v in trainer.callback_metrics.items()
                if k.startswith("val/loss_")
            },
            **self.fields,
            **totals,
            "sessions": sessions,
            "history": self.history,
        }

    @rank_zero_only
    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, status: str) -> dict[str, Any]:
        summary = self.summary(trainer, pl_module, status)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(self.path)
        return summary

    def _collect(self, trainer: pl.Trainer) -> None:
        # Collected on rank 0 of the training processes (the launching process of ddp_spawn has none of it).
        for callback in trainer.callbacks:
            if callback is not self and hasattr(callback, "summary_fields"):
                self.update(**callback.summary_fields())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collect(trainer)
        checkpoint = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
        self.update(checkpoint=checkpoint or None)
        self.write(trainer, pl_module, "finished")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        from attent_vision.tasks.stops import RunStopped, is_spawn_parent

        if is_spawn_parent(trainer):
            return  # the workers wrote the summary of the state they trained
        self._collect(trainer)
        if isinstance(exception, RunStopped):
            status = "requeued" if exception.requeue else "stopped"
        elif isinstance(exception, FloatingPointError):
            status = "diverged"
        else:
            status = "failed"
        self.update(error=f"{type(exception).__name__}: {exception}")
        self.write(trainer, pl_module, status)


class ValidateLastEpoch(pl.Callback):
    """Validates the last epoch whatever ``trainer.check_val_every_n_epoch`` is, so that a run validating every k
    epochs (a fixed cost cut, docs/benchmarks.md) still ends with its final validation loss and metrics; Lightning
    itself validates only the epochs divisible by k."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run resumed inside its last epoch (a stop mid-epoch or during validation) skips that epoch's start.
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1:
            trainer.check_val_every_n_epoch = 1


class SpawnedProcessGroupCleanup(pl.Callback):
    """Destroys the process group at the end of a ``ddp_spawn`` worker.

    Spawned workers exit right after fitting; leaving the gloo group to interpreter shutdown intermittently
    aborted a worker ("terminate called without an active exception") with torch 2.14. Processes started by
    ``ddp``/SLURM live on (validate, then fit), so their group is left alone.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

        launcher = getattr(trainer.strategy, "launcher", None)
        if isinstance(launcher, _MultiProcessingLauncher) and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class FinetuneSummary(pl.Callback):
    """Writes a fine-tuning run's ``summary.json``: wall time, the final and best evaluation metrics, history.

    The task module names its main metric (``main_metric``); "best" is the epoch where it peaked. Other parts of the
    run add fields (settings, chance level, load report) through :meth:`update`.

    Args:
        output_dir: Run directory; the file is ``<output_dir>/summary.json``.
    """

    def __init__(self, *, output_dir: str) -> None:
        self.path = Path(output_dir) / "summary.json"
        self.run_start = time.perf_counter()
        self.fields: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.previous_sessions: list[dict[str, Any]] = []
        self.resumed_from: str | None = None
        self._epoch_start = 0.0

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)

    def resume(self, checkpoint: str, global_step: int) -> None:
        """Continues the summary of the run this process resumes (sessions add up, history is kept)."""
        self.resumed_from = checkpoint
        try:
            previous = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        self.previous_sessions = previous.get("sessions") or [
            {key: previous.get(key) for key in ("status", "wall_time_s")}
        ]
        self.history = [h for h in previous.get("history", []) if h.get("optimizer_steps", 0) <= global_step]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after the epoch's validation, whose metrics the module computed in its own epoch-end hook.
        validated = getattr(pl_module, "last_val_epoch", None) == trainer.current_epoch
        values = getattr(pl_module, "last_val_metrics", {}) if validated else {}
        metrics = {k.removeprefix("val/"): v for k, v in values.items()}
        record = {
            "epoch": trainer.current_epoch,
            "optimizer_steps": trainer.global_step,
            "train_loss": _metric(trainer, "train/loss_epoch"),
            "val_loss": _metric(trainer, "val/loss") if validated else None,
            "epoch_time_s": round(time.perf_counter() - self._epoch_start, 3),
            **metrics,
        }
        self.history.append(record)

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, status: str) -> dict[str, Any]:
        main = getattr(pl_module, "main_metric", None)
        scored = [r for r in self.history if r.get(main) is not None]
        best = max(scored, key=lambda r: r[main]) if scored else None
        strip = ("epoch", "optimizer_steps", "train_loss", "val_loss", "epoch_time_s")
        metrics = {
            "main": main,
            "final": {k: v for k, v in scored[-1].items() if k not in strip} if scored else {},
            "best": {k: v for k, v in best.items() if k not in strip} if best else {},
            "best_epoch": best["epoch"] if best else None,
        }
        session = {
            "status": status,
            "resumed_from": self.resumed_from,
            "wall_time_s": round(time.perf_counter() - self.run_start, 3),
        }
        sessions = [*self.previous_sessions, session]
        return {
            "status": status,
            "wall_time_s": round(sum(s.get("wall_time_s") or 0.0 for s in sessions), 3),
            "restarts": len(sessions) - 1,
            "sessions": sessions,
            "epochs": trainer.current_epoch,
            "optimizer_steps": trainer.global_step,
            "metrics": metrics,
            "final_train_loss": _metric(trainer, "train/loss_epoch"),
            "final_val_loss": _metric(trainer, "val/loss"),
            **self.fields,
            "history": self.history,
        }

    @rank_zero_only
    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, status: str) -> dict[str, Any]:
        summary = self.summary(trainer, pl_module, status)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(self.path)
        return summary

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        self.update(
            checkpoint=(checkpoint.last_model_path or None) if checkpoint else None,
            best_checkpoint=(checkpoint.best_model_path or None) if checkpoint else None,
        )
        self.write(trainer, pl_module, "finished")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        from attent_vision.tasks.stops import RunStopped, is_spawn_parent

        if is_spawn_parent(trainer):
            return
        for callback in trainer.callbacks:
            if callback is not self and hasattr(callback, "summary_fields"):
                self.update(**callback.summary_fields())
        if isinstance(exception, RunStopped):
            status = "requeued" if exception.requeue else "stopped"
        else:
            status = "diverged" if isinstance(exception, FloatingPointError) else "failed"
        self.update(error=f"{type(exception).__name__}: {exception}")
        self.write(trainer, pl_module, status)


Summary = TypeVar("Summary", RunSummary, FinetuneSummary)


def run_callbacks(
    configured: Sequence[Any], summary_type: type[Summary], *, output_dir: str, last: Sequence[Any] = ()
) -> tuple[list[Any], Summary]:
    """The callbacks a run hands to its Trainer, and its summary callback among them.

    ``train.py`` and ``finetune.py`` always write ``summary.json`` (the report, resume accounting and the tests read
    it) and always clean up ``ddp_spawn`` process groups, whatever the ``callbacks`` group holds (``callbacks=none``
    included), so both are added here rather than configured, and so is the RNG-state capture that makes a resumed
    run draw what an uninterrupted one would. The order: the summary first (its epoch times then
    exclude the pictures drawn at epoch end; ``build_trainer`` still puts the stop handler before it), the
    configured callbacks, ``last`` (the AtteNT teacher), the last-epoch validation, then the process-group cleanup,
    whose teardown ends
    distributed communication. A summary or cleanup that a config still lists (configs written before they moved
    here) is used instead of a second one; further copies are dropped, so nothing runs twice.

    Args:
        configured: The instantiated ``callbacks`` group.
        summary_type: ``RunSummary`` (pretraining) or ``FinetuneSummary``.
        output_dir: Run directory of a new summary.
        last: Callbacks that go after the configured ones.
    """
    summary: Summary | None = None
    cleanup: SpawnedProcessGroupCleanup | None = None
    others: list[Any] = []
    for callback in [*configured, *last]:
        if isinstance(callback, RunSummary | FinetuneSummary):
            if summary is None and isinstance(callback, summary_type):
                summary = callback
            else:
                log.warning(
                    "callbacks: dropped a configured %s; the run's summary.json is written by one %s",
                    type(callback).__name__,
                    summary_type.__name__,
                )
        elif isinstance(callback, SpawnedProcessGroupCleanup):
            cleanup = cleanup or callback
        else:
            others.append(callback)
    if summary is None:
        summary = summary_type(output_dir=output_dir)
    others = [c for c in others if not isinstance(c, RngStateCapture)]  # one capture: the one added here
    callbacks = [
        summary,
        *others,
        ValidateLastEpoch(),
        RngStateCapture(),
        cleanup or SpawnedProcessGroupCleanup(),
    ]
    return callbacks, summary
