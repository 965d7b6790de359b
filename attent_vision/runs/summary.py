"""``summary.json``: one summary callback base, with a pretraining and a fine-tuning flavour.

Every run writes ``<run dir>/summary.json`` when fitting ends or fails (the report, resume accounting, the benchmark
and the tests read it). Other parts of the run add fields in two declared ways: the run itself through
:meth:`SummaryCallback.update` (settings, parameter counts, the initial validation loss), and callbacks that
implement :class:`SummaryContributor` (the stop handler's outcome, the pictures' drawing time), collected when the
summary is written.
"""

from __future__ import annotations

import json
import math
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from attent_vision.runs.stops import RunStopped, is_spawn_parent


@runtime_checkable
class SummaryContributor(Protocol):
    """A callback that adds fields to ``summary.json`` (collected on rank 0 when the summary is written)."""

    def summary_fields(self) -> dict[str, Any]:
        """The fields to merge into the summary; {} for none."""


@runtime_checkable
class ScoringClock(Protocol):
    """A callback that spends time scoring samples outside the training steps (the AtteNT teacher)."""

    scoring_time_s: float


def _metric(trainer: pl.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _status(exception: BaseException) -> str:
    if isinstance(exception, RunStopped):
        return "requeued" if exception.requeue else "stopped"
    return "diverged" if isinstance(exception, FloatingPointError) else "failed"


class SummaryCallback(pl.Callback, ABC):
    """Writes ``summary.json`` into the run directory when fitting ends (or fails).

    A run that resumes in its directory continues the summary: ``sessions`` lists every process that worked on the
    run (how it ended, its wall time), the totals add them up (work redone after a crash counts: it cost time), and
    the history keeps the epochs of the checkpoint it resumed from. Flavours add their own per-epoch records and
    fields (:meth:`summary`).

    Args:
        output_dir: Run directory; the file is ``<output_dir>/summary.json``.
    """

    # The per-session numbers a flavour carries over from a summary written before sessions were recorded.
    session_keys: tuple[str, ...] = ("status", "wall_time_s")

    def __init__(self, *, output_dir: str) -> None:
        self.path = Path(output_dir) / "summary.json"
        self.run_start = time.perf_counter()
        self.fields: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.previous_sessions: list[dict[str, Any]] = []
        self.resumed_from: str | None = None
        self._resumed_step = 0

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)

    def resume(self, checkpoint: str, global_step: int) -> dict[str, Any]:
        """Continues the summary of the run this process resumes, from a checkpoint at ``global_step``; returns the
        previous summary ({} when there is none)."""
        self.resumed_from = checkpoint
        self._resumed_step = global_step
        try:
            previous = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        self.previous_sessions = previous.get("sessions") or [{k: previous.get(k) for k in self.session_keys}]
        self.history = [h for h in previous.get("history", []) if h.get("optimizer_steps", 0) <= global_step]
        return previous

    def session(self, trainer: pl.Trainer, status: str) -> dict[str, Any]:
        """This process's entry in ``sessions``."""
        return {
            "status": status,
            "resumed_from": self.resumed_from,
            "wall_time_s": round(time.perf_counter() - self.run_start, 3),
        }

    @abstractmethod
    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, status: str) -> dict[str, Any]:
        """The summary.json contents of this run as it stands, ending with ``status``."""

    @rank_zero_only
    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, status: str) -> dict[str, Any]:
        summary = self.summary(trainer, pl_module, status)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(self.path)
        return summary

    def collect(self, trainer: pl.Trainer) -> None:
        """Merges what the other callbacks contribute (on rank 0 of the training processes: the launching process
        of ddp_spawn has none of it)."""
        for callback in trainer.callbacks:
            if callback is not self and isinstance(callback, SummaryContributor):
                self.update(**callback.summary_fields())

    def checkpoint_fields(self, trainer: pl.Trainer) -> dict[str, Any]:
        checkpoint = trainer.checkpoint_callback
        return {"checkpoint": (checkpoint.last_model_path or None) if checkpoint else None}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.collect(trainer)
        self.update(**self.checkpoint_fields(trainer))
        self.write(trainer, pl_module, "finished")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if is_spawn_parent(trainer):
            return  # the workers wrote the summary of the state they trained
        self.collect(trainer)
        self.update(error=f"{type(exception).__name__}: {exception}")
        self.write(trainer, pl_module, _status(exception))


class PretrainSummary(SummaryCallback):
    """Pretraining's ``summary.json``: wall, fit, training and validation time, samples and optimizer steps, scoring
    time, per-epoch train/val losses and the final ones, and the sessions' totals (scoring time and samples too)."""

    session_keys = ("status", "wall_time_s", "scoring_time_s")

    def __init__(self, *, output_dir: str) -> None:
        super().__init__(output_dir=output_dir)
        self.fit_start: float | None = None
        self._epoch_start = 0.0
        self._val_start = 0.0
        self._val_time = 0.0
        self._samples_at_start = 0
        self._scoring_at_start = 0.0

    def resume(self, checkpoint: str, global_step: int) -> dict[str, Any]:
        previous = super().resume(checkpoint, global_step)
        if "initial_val_loss" in previous:
            self.fields.setdefault("initial_val_loss", previous["initial_val_loss"])
        return previous

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
        clocks = [cb for cb in trainer.callbacks if cb is not self and isinstance(cb, ScoringClock)]
        return sum(float(cb.scoring_time_s) for cb in clocks)

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
        # Runs before the teacher prepares the next epoch (the run puts the teacher last), after validation.
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
            **self.session(trainer, status),
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


class FinetuneSummary(SummaryCallback):
    """A fine-tuning run's ``summary.json``: wall time, the final and best evaluation metrics, history.

    The task module names its main metric (``main_metric``); "best" is the epoch where it peaked.
    """

    def __init__(self, *, output_dir: str) -> None:
        super().__init__(output_dir=output_dir)
        self._epoch_start = 0.0

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
        sessions = [*self.previous_sessions, self.session(trainer, status)]
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

    def checkpoint_fields(self, trainer: pl.Trainer) -> dict[str, Any]:
        checkpoint = trainer.checkpoint_callback
        return {
            **super().checkpoint_fields(trainer),
            "best_checkpoint": (checkpoint.best_model_path or None) if checkpoint else None,
        }
