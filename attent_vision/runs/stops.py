"""What happens when a run is stopped: signals, a non-finite loss, an exception.

Every way a run can stop leaves a resumable checkpoint of its last good state, written by the training processes
(under ``ddp_spawn`` too, where Lightning would write it from the launching process with an untrained model):

- a stop signal (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) is noted by the handler and acted on at the next batch boundary,
  where every rank agrees to stop: ``checkpoints/stopped.ckpt`` is written, then :class:`RunStopped` is raised. The
  boundaries are those of training, of validation and of the teacher's scoring pass (``attent_vision.selection.scoring.stop_if_requested``), so
  that no long pass outlasts a scheduler's grace time; a resumed run redoes the interrupted validation or pass;
- a second SIGINT while such a stop is pending (Ctrl-C pressed again) stops at once, without a checkpoint
  (:class:`StoppedNow`): the state may be half-way through an update, and the newest checkpoint is the one to keep;
- a non-finite loss keeps its state apart in ``checkpoints/diverged/`` (never resumed from); the last good state is
  the newest regular checkpoint;
- any other exception writes ``checkpoints/on_exception.ckpt``.

``summary.json`` records how the run ended (``status``: finished, stopped, requeued, diverged, failed) and the
signal; ``run.py`` turns that into the exit status and a one-paragraph message.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer import call

from attent_vision.runs.checkpointing import (
    DIVERGED_DIR,
    NoLoadableCheckpointError,
    atomic_torch_save,
    find_resume_checkpoint,
    wait_for_checkpoint_writes,
)

log = logging.getLogger(__name__)

__all__ = [
    "STOP_SIGNALS",
    "CrashSafeSpawnDDPStrategy",
    "GracefulStop",
    "RunStopped",
    "StoppedNow",
    "forward_signals_to_workers",
    "is_spawn_parent",
    "request_requeue",
    "requeue_after_stop",
    "requeue_signal",
    "restore_signal_handlers",
]

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")


class RunStopped(Exception):
    """Raised at a batch boundary after a stop signal, once the stop checkpoint is written."""

    def __init__(self, signum: int, checkpoint: str | None, requeue: bool) -> None:
        self.signum, self.checkpoint, self.requeue = signum, checkpoint, requeue
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}" + (" (requeue)" if requeue else ""))


class StoppedNow(RunStopped):
    """Raised by the signal handler itself on a second SIGINT while a graceful stop is pending: wherever the run is.

    No checkpoint is written, since the state may be half-way through an optimizer step; a re-run resumes from the
    newest checkpoint. It is not a ``KeyboardInterrupt``, which Lightning turns into exit status 1.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum, None, False)
        self.args = (f"stopped at once by a second {signal.Signals(signum).name}",)


def is_spawn_parent(trainer: pl.Trainer) -> bool:
    """True in the process that launched ``ddp_spawn`` workers: it holds an untrained copy of the model."""
    launcher = getattr(trainer.strategy, "launcher", None)
    return (
        isinstance(launcher, _MultiProcessingLauncher)
        and trainer.world_size > 1
        and not (torch.distributed.is_available() and torch.distributed.is_initialized())
    )


def requeue_signal() -> int | None:
    """The signal that means "save and requeue" here: SIGUSR2 under submitit, SIGUSR1 under plain SLURM."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return signal.SIGUSR2
    if os.environ.get("SLURM_JOB_ID"):
        return signal.SIGUSR1
    return None


def _slurm_job_id() -> str | None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class GracefulStop(pl.Callback):
    """Stop signals → checkpoint at the next batch boundary; exceptions → crash checkpoint from the training ranks.

    The boundaries: after a training batch (but the last of an epoch, whose validation and end hooks come first),
    before a validation batch, before a batch of the teacher's scoring pass (``attent_vision.selection.scoring.stop_if_requested``), and as an
    epoch starts. Its handlers are in place from ``on_fit_start``, where a resumed run repeats its scoring pass.

    Args:
        dirpath: The run's ``checkpoints/`` folder.
        signals: Signal names to handle.
    """

    def __init__(self, *, dirpath: str, signals: tuple[str, ...] | list[str] = STOP_SIGNALS) -> None:
        self.dirpath = Path(dirpath)
        self.signals = [getattr(signal, name) for name in signals]
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        # From on_train_start: a stop writes stopped.ckpt (before it, the checkpoint resumed from is the state).
        self._training = False
        self.outcome: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ signals

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            log.warning(
                "Received %s: stopping after the batch in flight (of training, validation or the scoring pass), "
                "with a checkpoint; press Ctrl-C again (SIGINT) to stop at once, without one",
                signal.Signals(signum).name,
            )
        elif signum == signal.SIGINT:
            raise StoppedNow(signum)

    def _install_handlers(self) -> None:
        for signum in self.signals:
            try:
                previous = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook runner): signals stay as they are
                break
            self._previous.setdefault(signum, previous)  # the handler from before the fit, not our own

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before the teacher's on_fit_start (this callback comes first), whose scoring pass a resumed run repeats.
        self._training = False
        self._install_handlers()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Again after Lightning's own handlers (registered just before this hook), which this replaces.
        self._training = True
        self._install_handlers()
        # Lightning noted ours (from on_fit_start) as the handlers to put back when the fit ends: it is to put back
        # those from before the fit, or a finished fit would leave a handler that only notes signals.
        noted = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
        if isinstance(noted, dict):
            noted.update({signum: h for signum, h in self._previous.items() if signum in noted})

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # Lightning resumes a checkpoint taken here at the next epoch: the validation and epoch-end hooks (the
            # teacher's selection) of this one would never run. They check for the stop themselves, and with
            # nothing left to interrupt, the next epoch stops before its first batch.
            return
        if trainer.fit_loop.epoch_loop._should_accumulate():
            # Between the batches of one accumulated optimizer step: under DDP each rank's partial gradients are
            # its own and no checkpoint can hold them, so stops land on step boundaries only.
            return
        self.stop_if_requested(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop_if_requested(trainer, at="epoch start")

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        # Lightning checks no stop inside validation (trainer.should_stop waits for its end).
        if trainer.state.fn == "fit":
            self.stop_if_requested(trainer, at="validation")

    def stop_if_requested(
        self, trainer: pl.Trainer, *, at: Literal["batch", "validation", "epoch start"] = "batch"
    ) -> None:
        """Stops the run here if a stop signal came: writes ``stopped.ckpt``, then raises :class:`RunStopped`.

        Every rank must call it at the same point (they agree on stopping in one all-reduce).

        Args:
            trainer: The trainer being fitted.
            at: Where it is called: between batches of training or of a pass outside Lightning's loops (the
                teacher's scoring pass), between validation batches (the checkpoint then resumes by validating
                anew), or as an epoch starts (the checkpoint then resumes as one taken at the previous epoch's
                end).
        """
        stop = self.received is not None
        if trainer.world_size > 1:
            # Every rank stops at the same batch, or the others wait in the next all-reduce.
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = self._agreed_signal(trainer)
        if self._training and not trainer.sanity_checking and trainer.global_step > 0:
            path: str | None = str(self.dirpath / "stopped.ckpt")
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            if at == "validation":
                validation_not_run(checkpoint)
            elif at == "epoch start":
                epoch_not_started(checkpoint)
            trainer.strategy.save_checkpoint(checkpoint, path)
            wait_for_checkpoint_writes(trainer)  # on disk before the scheduler may kill or requeue the job
            trainer.strategy.barrier("GracefulStop.stopped_ckpt")
        else:
            # Before the first training step of this process (the resume's scoring pass, the sanity check): the
            # checkpoint it started from holds everything (if any), and Lightning may not have restored its loops.
            path = str(trainer.ckpt_path) if trainer.ckpt_path else None
        requeue = signum == requeue_signal()
        self.outcome = {
            "status": "requeued" if requeue else "stopped",
            "signal": signal.Signals(signum).name,
            "checkpoint": path,
        }
        raise RunStopped(signum, path, requeue)

    def _agreed_signal(self, trainer: pl.Trainer) -> int:
        local = self.received or 0
        if trainer.world_size > 1:
            value = torch.tensor([local], device=trainer.strategy.root_device)
            value = trainer.strategy.reduce(value, reduce_op="max")
            local = int(value.item())
        return local or signal.SIGTERM

    # ------------------------------------------------------------------------------------------ exceptions

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()  # teardown hooks do not run after an exception
        if isinstance(exception, StoppedNow) and not is_spawn_parent(trainer):
            self.outcome = {
                "status": "stopped",
                "signal": signal.Signals(exception.signum).name,
                "checkpoint": self._newest_checkpoint(),
                "at_once": True,
            }
            log.warning(
                "stopped at once: no checkpoint written; a re-run resumes from %s", self.outcome["checkpoint"]
            )
            return
        if is_spawn_parent(trainer) or isinstance(exception, RunStopped):
            return  # the workers wrote it / the stop checkpoint is already written
        if (
            trainer.global_step == 0
            and trainer.current_epoch == 0
            and not isinstance(exception, FloatingPointError)
        ):
            return  # nothing trained yet: a checkpoint would only shadow nothing
        diverged = isinstance(exception, FloatingPointError)
        if diverged:
            path = self.dirpath / DIVERGED_DIR / f"step_{trainer.global_step:07d}.ckpt"
        else:
            path = self.dirpath / "on_exception.ckpt"
        if trainer.is_global_zero or trainer.world_size == 1 or not diverged:
            # No barrier: another rank may never get here. Ranks hold identical states; the rename is atomic.
            atomic_torch_save(trainer._checkpoint_connector.dump_checkpoint(weights_only=False), path)
        self.outcome = {
            "status": "diverged" if diverged else "failed",
            "error": f"{type(exception).__name__}: {exception}",
            "checkpoint": str(path),
        }
        log.info("wrote %s after %s", path, type(exception).__name__)

    def _newest_checkpoint(self) -> str | None:
        """The checkpoint a re-run resumes from (None when there is none that loads)."""
        try:
            point = find_resume_checkpoint(self.dirpath.parent)
        except NoLoadableCheckpointError:
            return None
        return str(point.path) if point is not None else None

    def summary_fields(self) -> dict[str, Any]:
        return {"stop": self.outcome} if self.outcome else {}


def epoch_not_started(checkpoint: dict[str, Any]) -> None:
    """Rewinds the epoch progress of a checkpoint taken as an epoch starts, before its first batch, to the end of the
    epoch before, where nothing else differs: Lightning resumes such a checkpoint (as ModelCheckpoint's at epoch end)
    with this epoch's start hooks and all its batches.

    (Resumed as it was taken, Lightning would carry the previous epoch's batch counters into this one.)
    """
    progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]
    for counters in (progress["total"], progress["current"]):
        counters["ready"] = counters["started"] = counters["processed"]
        counters["completed"] = counters["processed"] - 1


def validation_not_run(checkpoint: dict[str, Any]) -> None:
    """Rewinds the validation progress of a checkpoint taken between validation batches to "its first batch in
    flight": Lightning then resumes by running that validation from its start, then the epoch's end hooks.

    (A checkpoint at a batch boundary reads as "validation done" or "not due", and Lightning would skip it.)
    """
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
    total, current = progress["total"], progress["current"]
    before = total["completed"] - current["completed"]  # validation batches of earlier runs in this epoch
    total.update(ready=before + 1, started=before + 1, processed=before, completed=before)
    current.update(ready=1, started=1, processed=0, completed=0)
    progress["is_last_batch"] = False


class _CrashAwareSpawnLauncher(_MultiProcessingLauncher):
    """Runs the exception hooks inside each worker, where the trained state lives."""

    def _wrapping_function(
        self, process_idx: int, trainer: pl.Trainer | None, *args: Any, **kwargs: Any
    ) -> None:
        try:
            return super()._wrapping_function(process_idx, trainer, *args, **kwargs)
        except BaseException as exception:
            if trainer is not None:
                call._call_callback_hooks(trainer, "on_exception", exception)
                for logger in trainer.loggers:
                    logger.finalize("failed")
            raise


class CrashSafeSpawnDDPStrategy(DDPStrategy):
    """``ddp_spawn`` whose crash checkpoints and summaries come from the workers, not the launching process."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(start_method="spawn", **kwargs)

    def _configure_launcher(self) -> None:
        self._launcher = _CrashAwareSpawnLauncher(self, start_method=self._start_method)


def forward_signals_to_workers(
    trainer: pl.Trainer, signals: tuple[str, ...] = STOP_SIGNALS
) -> dict[int, Any]:
    """In a ``ddp_spawn`` launching process: pass stop signals on to the workers instead of dying alone."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, _MultiProcessingLauncher):
        return {}

    def forward(signum: int, frame: FrameType | None) -> None:
        for proc in getattr(launcher, "procs", []):
            if proc.is_alive():
                os.kill(proc.pid, signum)

    previous = {}
    for name in signals:
        signum = getattr(signal, name)
        previous[signum] = signal.signal(signum, forward)
    return previous


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    """Puts back the handlers that :func:`forward_signals_to_workers` replaced."""
    for signum, handler in previous.items():
        if handler is not None:
            signal.signal(signum, handler)


def requeue_after_stop() -> bool:
    """Hands the stopped job back to its scheduler: submitit's own handler under submitit (it requeues the job and
    exits), else ``scontrol requeue`` from the first rank of a plain SLURM job. False when there is no scheduler."""
    signum = requeue_signal()
    if signum is None:
        return False
    if signum == signal.SIGUSR2:
        handler = signal.getsignal(signal.SIGUSR2)
        if callable(handler):
            handler(signal.SIGUSR2, None)
            return True
        return False
    if int(os.environ.get("SLURM_PROCID", "0")) != 0:
        return True
    return request_requeue()


def request_requeue() -> bool:
    """``scontrol requeue`` of this SLURM job (plain sbatch + srun; submitit requeues by itself)."""
    job = _slurm_job_id()
    if not job:
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job)
    return True
