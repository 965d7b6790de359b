"""What the teacher needs from a LightningModule and a LightningDataModule, written as ``typing.Protocol``s.

Nothing here imports the project's models, tasks or data: any module and datamodule that have these members
work. :func:`missing` turns an unmet protocol into a sentence that names each missing member with its signature.

Module side:

* :class:`SelectableModule` — ``training_step`` returns ``{"loss", "sample_loss": (B,) float, "index": (B,)
  int64}`` (checked on the first batch; online scoring reads it).
* :class:`ScorableModule` — ``score_batch(batch, *, seed, tasks=None) -> (B,)`` for a full scoring pass.
* :class:`PlannedSchedule` — ``total_steps`` / ``steps_per_full_epoch`` receive the plan's exact step counts.
* :class:`ResizableSchedule` — ``resize_schedule(total_steps, *, at_step)`` for plans resolved during training.
* :class:`WeightedLossModule` — ``set_sample_weights(weights)`` for selectors that weight losses (InfoBatch).

Datamodule side: :class:`SelectableDataModule` (required), :class:`ScoringDataModule` and
:class:`LabelledDataModule` (optional).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sized
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor
from torch.utils.data import Dataset, Sampler


class TeacherSetupError(RuntimeError):
    """The trainer, module or datamodule does not meet the teacher's contract; the message says what to change."""


@runtime_checkable
class SelectableModule(Protocol):
    def training_step(self, batch: Any, batch_idx: int) -> Mapping[str, Tensor]:
        """Returns ``{"loss": scalar, "sample_loss": (B,) float, "index": (B,) int64}``."""


@runtime_checkable
class ScorableModule(Protocol):
    def score_batch(self, batch: Any, *, seed: int | None) -> Tensor:
        """Forward-only (B,) per-sample scores; with ``seed`` set, sample i's randomness is a function of
        (seed, index[i]). May also take ``tasks: Sequence[str] | None`` (the scored subset)."""


@runtime_checkable
class PlannedSchedule(Protocol):
    total_steps: int | None
    steps_per_full_epoch: int | None


@runtime_checkable
class ResizableSchedule(Protocol):
    def resize_schedule(self, total_steps: int, *, at_step: int) -> None:
        """The run now has ``total_steps`` optimizer steps; steps before ``at_step`` are already trained."""


@runtime_checkable
class WeightedLossModule(Protocol):
    def set_sample_weights(self, weights: Tensor | None) -> None:
        """(M,) float32 loss weight per dataset index for the coming epoch; None = every sample weighs 1."""


@runtime_checkable
class SelectableDataModule(Protocol):
    batch_size: int

    def train_dataset(self) -> Sized:
        """The training set; item i carries ``index`` i."""

    def set_train_sampler(self, sampler: Sampler[int]) -> None:
        """The train loader must draw its indices from ``sampler`` (the teacher changes it between epochs)."""


@runtime_checkable
class ScoringDataModule(Protocol):
    def scoring_dataset(self, *, train_transform: bool) -> Dataset:
        """The training set with evaluation transforms (``train_transform=False``) for reproducible scoring."""


@runtime_checkable
class LabelledDataModule(Protocol):
    def sample_labels(self) -> Tensor | None:
        """Int64 class of every training sample, for the class histograms in the logs."""


@runtime_checkable
class StopsLongPasses(Protocol):
    """A callback that can end the run between the batches of a pass that runs outside Lightning's loops (the
    teacher's scoring pass), as it does between training batches; the run layer's stop handler is one."""

    def stop_if_requested(self, trainer: Any) -> None:
        """Called before each batch on every rank: raises to stop the run when a stop signal came."""


@dataclass(frozen=True)
class SelectionSnapshot:
    """What the teacher shows observers (the selection gallery) of its state; the tensors are read-only views.

    Attributes:
        reselections: Re-selections so far (the length of the teacher's history).
        last_event: The latest re-selection's event (``selection.jsonl``'s record); {} before the first.
        scores: (N,) float32 score of every training sample; None before the teacher is set up.
        measured: (N,) bool: the sample was scored at least once and its score is finite; None with ``scores``.
        pool: Dataset indices the current epoch trains on; empty on full-data epochs.
    """

    reselections: int
    last_event: Mapping[str, Any]
    scores: Tensor | None
    measured: Tensor | None
    pool: frozenset[int]


@runtime_checkable
class ShowsSelection(Protocol):
    """A callback whose selection state others may draw (the AtteNT teacher)."""

    def selection_snapshot(self) -> SelectionSnapshot:
        """The current state, cheap enough to ask for at every epoch."""


SIGNATURES: dict[type, dict[str, str]] = {
    SelectableModule: {
        "training_step": "training_step(batch, batch_idx) -> {'loss', 'sample_loss', 'index'}"
    },
    ScorableModule: {"score_batch": "score_batch(batch, *, seed: int | None) -> Tensor (B,)"},
    PlannedSchedule: {
        "total_steps": "total_steps: int | None",
        "steps_per_full_epoch": "steps_per_full_epoch: int | None",
    },
    ResizableSchedule: {"resize_schedule": "resize_schedule(total_steps: int, *, at_step: int) -> None"},
    WeightedLossModule: {"set_sample_weights": "set_sample_weights(weights: Tensor | None) -> None"},
    SelectableDataModule: {
        "batch_size": "batch_size: int",
        "train_dataset": "train_dataset() -> Dataset",
        "set_train_sampler": "set_train_sampler(sampler: Sampler[int]) -> None",
    },
    ScoringDataModule: {"scoring_dataset": "scoring_dataset(*, train_transform: bool) -> Dataset"},
    LabelledDataModule: {"sample_labels": "sample_labels() -> Tensor | None"},
}


def missing(obj: Any, protocol: type, *, owner: str, purpose: str) -> list[str]:
    """One problem sentence per member of ``protocol`` that ``obj`` lacks, naming its signature and why."""
    return [
        f"{owner} needs `{signature}` ({protocol.__name__}) {purpose}"
        for name, signature in SIGNATURES[protocol].items()
        if obj is None or not hasattr(obj, name)
    ]


def accepts_keyword(function: Any, name: str) -> bool:
    """Whether ``function`` takes the keyword argument ``name`` (or any keyword through ``**kwargs``)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True  # not introspectable: let the call decide
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


def trainer_problems(trainer: Any) -> list[str]:
    """What the trainer (and its datamodule) must change for the teacher: its sampler, and whole epochs of optimizer
    steps, which the plan counts (with ``accumulate_grad_batches`` too: the plan and the sampler count its
    windows)."""
    problems = []
    if trainer._accelerator_connector.use_distributed_sampler:
        problems.append("trainer.use_distributed_sampler must be false (Lightning would re-pad the subset)")
    if trainer.reload_dataloaders_every_n_epochs != 1:
        problems.append("trainer.reload_dataloaders_every_n_epochs must be 1 (epoch lengths change)")
    if trainer.max_epochs is None or trainer.max_epochs < 1:
        problems.append("trainer.max_epochs must be set: the plan is built from it")
    # The plan counts the optimizer steps of whole epochs; these settings would break that.
    if trainer.limit_train_batches not in (1.0, None) or trainer.overfit_batches:
        problems.append("trainer.limit_train_batches / overfit_batches cannot be combined with the teacher")
    if trainer.max_steps not in (-1, None):
        problems.append("trainer.max_steps must be -1: the run length is trainer.max_epochs")
    if trainer.val_check_interval != 1.0:
        problems.append("trainer.val_check_interval must be 1.0 (validate at epoch ends)")
    if trainer.strategy.restore_checkpoint_after_setup:
        problems.append(
            f"strategy {type(trainer.strategy).__name__} restores checkpoints after setup, "
            "after the teacher has prepared its first epoch"
        )
    problems += missing(
        trainer.datamodule,
        SelectableDataModule,
        owner="the datamodule",
        purpose="to take the teacher's sampler",
    )
    return problems


__all__ = [
    "SIGNATURES",
    "LabelledDataModule",
    "PlannedSchedule",
    "ResizableSchedule",
    "ScorableModule",
    "ScoringDataModule",
    "SelectableDataModule",
    "SelectableModule",
    "TeacherSetupError",
    "WeightedLossModule",
    "accepts_keyword",
    "missing",
    "trainer_problems",
]
