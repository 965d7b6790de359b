"""What happens when a run is stopped: signals, a non-finite loss, an exception.

Every way a run can stop leaves a resumable checkpoint of its last good state, written by the training processes
(under ``ddp_spawn`` too, where Lightning would write it from the launching process with an untrained model):

- a stop signal (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) is noted by the handler and acted on at the next batch boundary,
  where every rank agrees to stop: ``checkpoints/stopped.ckpt`` is written, then :class:`RunStopped` is raised;
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
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer import call

from attent_vision.tasks.checkpointing import DIVERGED_DIR, atomic_torch_save

log = logging.getLogger(__name__)

__all__ = [
    "STOP_SIGNALS",
    "CrashSafeSpawnDDPStrategy",
    "GracefulStop",
    "RunStopped",
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

    Args:
        dirpath: The run's ``checkpoints/`` folder.
        signals: Signal names to handle.
    """

    def __init__(self, *, dirpath: str, signals: tuple[str, ...] | list[str] = STOP_SIGNALS) -> None:
        self.dirpath = Path(dirpath)
        self.signals = [getattr(signal, name) for name in signals]
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self.outcome: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ signals

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            log.warning(
                "Received %s: stopping at the end of this batch, after a checkpoint (send it again to stop now)",
                signal.Signals(signum).name,
            )
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning's own handlers (registered just before this hook), which this replaces for these signals.
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook runner): signals stay as they are
                break

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        stop = self.received is not None
        if (
            trainer.world_size > 1
        ):  # every rank stops at the same batch, or the others wait in the next all-reduce
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = self._agreed_signal(trainer)
        path = self.dirpath / "stopped.ckpt"
        trainer.save_checkpoint(path)
        requeue = signum == requeue_signal()
        self.outcome = {
            "status": "requeued" if requeue else "stopped",
            "signal": signal.Signals(signum).name,
            "checkpoint": str(path),
        }
        raise RunStopped(signum, str(path), requeue)

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

    def summary_fields(self) -> dict[str, Any]:
        return {"stop": self.outcome} if self.outcome else {}


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
