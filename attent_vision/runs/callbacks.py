"""The callbacks every run gets, whatever its ``callbacks`` group holds (:func:`run_callbacks`), and the EMA of the
weights that ``callbacks=ema`` adds (:class:`EMAWeights`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

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


@dataclass(frozen=True)
class EMAUpdate:
    """One EMA update of a group of tensors (``AveragedModel``'s ``multi_avg_fn``; a class so that it pickles into
    ``ddp_spawn`` workers, which a closure does not).

    Floating-point tensors move to ``ema + (1 - d) * (current - ema)``; others (counters) are copied. With
    ``warmup``, ``d = min(decay, 1 - (1 + n) ** -warmup_power)`` after n updates (timm's ``ModelEmaV3``), so the
    average follows the early, fast-moving weights closely and reaches ``decay`` only after many steps.
    """

    decay: float
    warmup: bool = False
    warmup_power: float = 0.75

    def decay_after(self, updates: int) -> float:
        """The decay of the update that follows ``updates`` earlier ones."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + updates) ** -self.warmup_power)

    @torch.no_grad()
    def __call__(self, averaged: list[Tensor], current: list[Tensor], updates: Tensor) -> None:
        # With warmup, int() reads the update count (a device sync); without, nothing waits.
        decay = self.decay_after(int(updates)) if self.warmup else self.decay
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        else:
            torch._foreach_copy_(averaged, current)


class EMAWeights(WeightAveraging):
    """An exponential moving average (EMA) of the module's weights: Lightning's ``WeightAveraging``, updated after
    optimizer steps (``callbacks=ema`` adds it to the default callbacks of train.py and finetune.py).

    What Lightning's callback does with it, and so what a run with it gives:

    - training itself is unchanged, and so is the AtteNT teacher, which scores between epochs on the trained
      weights (the average is swapped in only for validation, and back before the epoch-end hooks);
    - validation (the logged ``val/*`` metrics, the best fine-tuning checkpoint) measures the averaged weights, and
      when training ends the module holds them;
    - every checkpoint's ``state_dict`` holds the averaged weights (what ``finetune.py pretrained=`` and any
      state-dict reader load), ``current_model_state`` the trained ones and ``averaging_state`` the update count,
      so a resumed run restores both and continues as if never stopped.

    Args:
        decay: Weight of the old average per update; it should suit the run length (the average spans about
            ``1 / (1 - decay)`` updates: 0.9999 is 10,000 steps, for long runs).
        warmup: Ramp the decay up as ``1 - (1 + n) ** -warmup_power`` after n updates, capped at ``decay`` (timm's
            ``ModelEmaV3`` warmup), so that short runs average their recent steps instead of their start.
        warmup_power: 3/4 reaches 0.999 after 10k updates and 0.9999 after 215k; 2/3 after 31.6k and 1M.
        update_every_n_steps: Update after every n-th optimizer step.
        update_starting_at_step: First optimizer step (0-based) that averages; until then the average is a
            copy of the trained weights, and the warmup starts there.
        device: Where the average lives (default: with the module; "cpu" saves accelerator memory).
    """

    def __init__(
        self,
        *,
        decay: float = 0.9999,
        warmup: bool = True,
        warmup_power: float = 0.75,
        update_every_n_steps: int = 1,
        update_starting_at_step: int = 0,
        device: str | None = None,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay: {decay} is outside [0, 1)")
        if warmup_power <= 0:
            raise ValueError(f"callbacks.ema.warmup_power: {warmup_power} must be > 0")
        if update_every_n_steps < 1:
            raise ValueError(f"callbacks.ema.update_every_n_steps: {update_every_n_steps} must be >= 1")
        if update_starting_at_step < 0:
            raise ValueError(f"callbacks.ema.update_starting_at_step: {update_starting_at_step} must be >= 0")
        super().__init__(
            device=device,
            use_buffers=True,
            multi_avg_fn=EMAUpdate(decay=decay, warmup=warmup, warmup_power=warmup_power),
        )
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self._swapped = False  # the module holds the average (while validating)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """After every optimizer step before ``update_starting_at_step`` (a copy), then every
        ``update_every_n_steps``-th."""
        if step_idx is None:
            return False
        if step_idx < self.update_starting_at_step:
            return True
        return (step_idx - self.update_starting_at_step) % self.update_every_n_steps == 0

    def _swap_models(self, pl_module: pl.LightningModule) -> None:
        super()._swap_models(pl_module)
        self._swapped = not self._swapped

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self._swapped or self._average_model is None:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            return
        # A stop or crash checkpoint taken while validating, with the weights swapped: the module's state (already
        # in state_dict) is the average and the copy holds the trained weights. (Lightning's callback would store
        # them the wrong way round, and a resumed run would train on from the average.)
        state = self._average_model.state_dict()
        checkpoint["current_model_state"] = {k[7:]: v for k, v in state.items() if k.startswith("module.")}
        checkpoint["averaging_state"] = {k: v for k, v in state.items() if not k.startswith("module.")}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._average_model is not None and trainer.global_step - 1 < self.update_starting_at_step:
            self._average_model.n_averaged.zero_()  # AveragedModel copies the weights into an empty average
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


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
