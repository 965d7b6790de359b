"""The callbacks every run gets, whatever its ``callbacks`` group holds (:func:`run_callbacks`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch

from attent_vision.runs.rng_capture import RngStateCapture
from attent_vision.runs.summary import SummaryCallback

log = logging.getLogger(__name__)


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


Summary = TypeVar("Summary", bound=SummaryCallback)


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
        summary_type: ``PretrainSummary`` or ``FinetuneSummary``.
        output_dir: Run directory of a new summary.
        last: Callbacks that go after the configured ones.
    """
    summary: Summary | None = None
    cleanup: SpawnedProcessGroupCleanup | None = None
    others: list[Any] = []
    for callback in [*configured, *last]:
        if isinstance(callback, SummaryCallback):
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
