"""InfoBatch (Qin et al., ICLR 2024) in the teacher's harness: unbiased dynamic pruning of well-learned samples.

Before every epoch until the annealing phase, a random share ``prune_ratio`` of the samples whose last score is
below the mean is left out, and the kept below-mean samples' losses are scaled up so that the epoch's summed
loss is an unbiased estimate of the full-data epoch's. The final ``1 - delta`` of the epochs train on the full
set, unweighted. Scores come from the training losses (``scoring=online``), as InfoBatch does.

Two choices differ from the reference code, both to make the run exact and reproducible:

* The pruned count is deterministic, ``round(prune_ratio * B)`` of the B below-mean samples (the reference
  drops each with probability r), adjusted by less than the world size so the kept set shards evenly. An
  epoch's length is then known the moment its scores are, and the plan resolves it exactly (``plan.py``).
* The weight is ``B / (B - pruned)``, the exact inverse keep probability (``1 / (1 - r)`` up to rounding), so
  the expectation over prunings of the weighted summed loss equals the full-data summed loss exactly.

The first epoch trains on the full set (there are no scores yet; the reference's initial scores of 3.0 pruned
epoch 0 at random, its issue #25).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from attent_vision.selection.plan import EpochPlan, PlanRequest
from attent_vision.selection.schedules import IntervalSchedule, RatioSchedule
from attent_vision.selection.selectors import Selection, Selector


def pruned_count(*, below_mean: int, dataset_size: int, prune_ratio: float, world_size: int = 1) -> int:
    """round(prune_ratio x below_mean), moved by less than ``world_size`` so the kept count is a multiple of it."""
    count = math.floor(prune_ratio * below_mean + 0.5)
    count += (dataset_size - count) % world_size
    if count > below_mean:
        count -= world_size
    return max(0, count)


def prune(scores: Tensor, *, prune_ratio: float, world_size: int, generator: torch.Generator) -> Selection:
    """Leave out a random ``prune_ratio`` of the below-mean samples; weight the kept below-mean ones up.

    Returns:
        The kept indices (sorted int64) and (M,) float32 weights: ``B / (B - pruned)`` on kept below-mean
        samples, 1 elsewhere.
    """
    size = scores.numel()
    below = torch.nonzero(scores.double() < scores.double().mean()).squeeze(1)
    count = pruned_count(
        below_mean=below.numel(), dataset_size=size, prune_ratio=prune_ratio, world_size=world_size
    )
    order = below[torch.randperm(below.numel(), generator=generator)]
    keep = torch.ones(size, dtype=torch.bool)
    keep[order[:count]] = False
    weights = torch.ones(size, dtype=torch.float32)
    if count < below.numel():
        weights[order[count:]] = below.numel() / (below.numel() - count)
    return Selection(torch.nonzero(keep).squeeze(1).to(torch.int64), weights)


def anneal_start(max_epochs: int, delta: float) -> int:
    """First full (annealing) epoch: InfoBatch prunes epochs e < delta x max_epochs."""
    return math.ceil(delta * max_epochs - 1e-9)  # 0.9 x 10 is 9.000000000000002 in floating point


def infobatch_plan(request: PlanRequest, *, prune_ratio: float, delta: float) -> list[EpochPlan]:
    """Full epoch 0, pruned epochs up to ``delta x max_epochs``, then full epochs.

    Pruned epochs are *estimated* until selected: before any score exists the estimate assumes half of the
    samples lie below the mean; each selection then fixes its epoch and re-estimates the later ones.

    Raises:
        ValueError: Naming ``selection.delta`` when no epoch would be pruned.
    """
    end = anneal_start(request.max_epochs, delta)
    if end <= 1:
        raise ValueError(
            f"selection.delta: {delta} x trainer.max_epochs={request.max_epochs} leaves no pruned epoch after the "
            "first (which gathers the scores); raise selection.delta or trainer.max_epochs"
        )
    kept = request.dataset_size - pruned_count(
        below_mean=request.dataset_size // 2,
        dataset_size=request.dataset_size,
        prune_ratio=prune_ratio,
        world_size=request.world_size,
    )
    pruned = [request.subset_epoch(e, None, kept, reselect=True, estimated=True) for e in range(1, end)]
    return [request.full_epoch(0), *pruned, *(request.full_epoch(e) for e in range(end, request.max_epochs))]


@dataclass(frozen=True, kw_only=True)
class InfoBatchPruner(Selector):
    """InfoBatch's pruning with loss rescaling and annealing (ignores the ratio and interval schedules).

    Args:
        prune_ratio: Share r of the below-mean samples left out of each pruned epoch, in (0, 1).
        delta: Epochs e < delta x max_epochs are pruned (the first excepted); the rest train on everything.
    """

    strategy: str = "infobatch"
    prune_ratio: float = 0.5
    delta: float = 0.875

    weights_losses: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0 < self.prune_ratio < 1:
            raise ValueError(f"selection.prune_ratio: {self.prune_ratio} is outside (0, 1)")
        if not 0 < self.delta <= 1:
            raise ValueError(f"selection.delta: {self.delta} is outside (0, 1]")

    def plan(
        self, request: PlanRequest, *, ratio: RatioSchedule, interval: IntervalSchedule
    ) -> list[EpochPlan]:
        return infobatch_plan(request, prune_ratio=self.prune_ratio, delta=self.delta)

    def select(
        self, scores: Tensor, epoch: EpochPlan, *, generator: torch.Generator, world_size: int
    ) -> Selection:
        return prune(scores, prune_ratio=self.prune_ratio, world_size=world_size, generator=generator)
