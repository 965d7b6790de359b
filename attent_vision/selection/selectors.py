"""Selectors: which samples each epoch trains on, and how the run's epochs are laid out for them.

A selector is what ``attent_vision/conf/pretrain/selection/<name>.yaml`` builds. It plans the run (:meth:`Selector.plan`) and, before
every epoch its plan marks ``reselect``, turns the score bank into a :class:`Selection`. The teacher coordinates
selectors without knowing their names, so a new strategy is one class plus one YAML file::

    @dataclass(frozen=True, kw_only=True)
    class LossProportional(CycleSelector):
        strategy: str = "lossprop"

        def choose(self, scores, k, *, generator):
            return torch.multinomial(scores.clamp_min(1e-12), k, replacement=False, generator=generator)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from attent_vision.selection.plan import EpochPlan, PlanRequest, Reselect, cycle_plan, full_data_plan
from attent_vision.selection.schedules import IntervalSchedule, RatioSchedule
from attent_vision.selection.strategies import Normalization, select_hard, select_random, select_soft


@dataclass(frozen=True)
class Selection:
    """One epoch's training pool.

    Attributes:
        indices: Sorted int64 dataset indices the epoch trains on.
        weights: Optional (M,) float32 loss weight per dataset index for this epoch (InfoBatch's rescaling);
            None means every sample weighs 1.
    """

    indices: Tensor
    weights: Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class Selector(ABC):
    """Base of every selection strategy.

    Args:
        strategy: Its name in ``selection.jsonl``, ``summary.json`` and the sweep report.
        total_cycles: Cycles of the epoch plan. Strategies without cycles ignore it; it exists on all of them
            so that one sweep (``-m selection=none,soft selection.total_cycles=2``) can set it for every one.
    """

    strategy: str
    total_cycles: int = 10

    needs_scores: ClassVar[bool] = True
    """False: the teacher never scores for this selector (no scoring pass, no online updates)."""
    weights_losses: ClassVar[bool] = False
    """True: its selections carry loss weights, so the LightningModule must be a ``WeightedLossModule``."""

    @abstractmethod
    def plan(
        self, request: PlanRequest, *, ratio: RatioSchedule, interval: IntervalSchedule
    ) -> list[EpochPlan]:
        """Every epoch of the run (``ratio``/``interval`` are the configured schedules; ignore them if unused)."""

    @abstractmethod
    def select(
        self, scores: Tensor, epoch: EpochPlan, *, generator: torch.Generator, world_size: int
    ) -> Selection:
        """The pool of ``epoch`` from the (M,) float32 ``scores``, drawing randomness only from ``generator``."""

    def summary(self) -> dict[str, Any]:
        """Its settings for ``summary.json`` (every constructor key)."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class FullData(Selector):
    """The baseline: every epoch on the whole training set; nothing is scored or selected."""

    strategy: str = "none"
    needs_scores: ClassVar[bool] = False

    def plan(
        self, request: PlanRequest, *, ratio: RatioSchedule, interval: IntervalSchedule
    ) -> list[EpochPlan]:
        return full_data_plan(request)

    def select(
        self, scores: Tensor, epoch: EpochPlan, *, generator: torch.Generator, world_size: int
    ) -> Selection:
        raise RuntimeError("full-data training never selects")  # its plan has no re-selection


@dataclass(frozen=True, kw_only=True)
class CycleSelector(Selector):
    """AtteNT's strategies: k = ratio x M samples per cycle, on the cycle plan (see ``plan.cycle_plan``).

    Subclasses implement :meth:`choose` only.

    Args:
        reselect: ``cycle`` draws once per cycle; ``every`` draws again before each subset epoch.
    """

    reselect: Reselect = "cycle"

    def __post_init__(self) -> None:
        if self.total_cycles < 1:
            raise ValueError(f"selection.total_cycles: {self.total_cycles} must be >= 1")
        if self.reselect not in ("cycle", "every"):
            raise ValueError(f"selection.reselect: unknown {self.reselect!r}; allowed: cycle, every")

    @abstractmethod
    def choose(self, scores: Tensor, k: int, *, generator: torch.Generator) -> Tensor:
        """k distinct indices into ``scores``."""

    def plan(
        self, request: PlanRequest, *, ratio: RatioSchedule, interval: IntervalSchedule
    ) -> list[EpochPlan]:
        return cycle_plan(
            request, ratio=ratio, interval=interval, total_cycles=self.total_cycles, reselect=self.reselect
        )

    def select(
        self, scores: Tensor, epoch: EpochPlan, *, generator: torch.Generator, world_size: int
    ) -> Selection:
        k = epoch.num_samples
        if not 1 <= k <= scores.numel():
            raise ValueError(f"k={k} is outside [1, {scores.numel()}]")
        chosen = self.choose(scores, k, generator=generator).to(torch.int64)
        if chosen.numel() > 1 and not bool((chosen[1:] > chosen[:-1]).all()):  # hard and soft come sorted
            chosen = chosen.sort().values
        return Selection(chosen)


@dataclass(frozen=True, kw_only=True)
class RandomSelector(CycleSelector):
    """k samples uniformly at random: the control without a difficulty prior (scores are never computed)."""

    strategy: str = "random"
    needs_scores: ClassVar[bool] = False

    def choose(self, scores: Tensor, k: int, *, generator: torch.Generator) -> Tensor:
        return select_random(scores, k, generator=generator)


@dataclass(frozen=True, kw_only=True)
class HardSelector(CycleSelector):
    """The k highest-score (most difficult) samples."""

    strategy: str = "hard"

    def choose(self, scores: Tensor, k: int, *, generator: torch.Generator) -> Tensor:
        return select_hard(scores, k)


@dataclass(frozen=True, kw_only=True)
class SoftSelector(CycleSelector):
    """Gumbel-top-k: k samples without replacement with weights ``normalization(score)^(1/temperature)``.

    Args:
        temperature: Scales the log-weights before the Gumbel noise: -> 0 tends to hard, -> inf to random.
        normalization: ``softmax`` or ``sigmoid`` of the scores.
    """

    strategy: str = "soft"
    reselect: Reselect = "every"  # the reference re-draws before every subset epoch
    temperature: float = 1.0
    normalization: Normalization = "softmax"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"selection.temperature: {self.temperature} must be > 0")
        if self.normalization not in ("softmax", "sigmoid"):
            raise ValueError(
                f"selection.normalization: unknown {self.normalization!r}; allowed: softmax, sigmoid"
            )

    def choose(self, scores: Tensor, k: int, *, generator: torch.Generator) -> Tensor:
        return select_soft(
            scores, k, generator=generator, temperature=self.temperature, normalization=self.normalization
        )


SELECTORS: dict[str, type[CycleSelector]] = {
    "random": RandomSelector,
    "hard": HardSelector,
    "soft": SoftSelector,
}


def select(
    strategy: Literal["random", "hard", "soft"],
    scores: Tensor,
    k: int,
    *,
    generator: torch.Generator,
    **options: Any,
) -> Tensor:
    """Sorted int64 indices of k samples chosen by a named cycle strategy (for scripts and benchmarks)."""
    if strategy not in SELECTORS:
        raise ValueError(f"selection.strategy: unknown {strategy!r}; allowed: {', '.join(SELECTORS)}")
    epoch = EpochPlan(0, "subset", 0, k / max(1, scores.numel()), k, k, True)  # k is checked by select
    return SELECTORS[strategy](**options).select(scores, epoch, generator=generator, world_size=1).indices
