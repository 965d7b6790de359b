"""The epoch plan: for every epoch, full or subset, its cycle, ratio, samples, steps and re-selections.

Structure (as the reference, with no epochs dropped): one initial full epoch, then ``total_cycles`` cycles. Each
cycle re-selects a subset, trains ``interval`` epochs on it, then trains full epochs until the cycle ends. The
``max_epochs - 1`` epochs after the first are shared out as evenly as possible; the later cycles (whose
intervals are longest) get the remainder. The plan is a pure function, printable before any training.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from attent_vision.selection.schedules import IntervalSchedule, RatioSchedule

STRATEGIES = ("none", "random", "hard", "soft")


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch does. ``cycle`` is None for epochs outside any cycle (the first, and every epoch without
    selection); ``reselect`` says that scores are refreshed and a subset drawn before the epoch starts."""

    epoch: int
    kind: Literal["full", "subset"]
    cycle: int | None
    ratio: float
    num_samples: int
    num_steps: int
    reselect: bool

    def as_dict(self) -> dict:
        return asdict(self)


def subset_size(ratio: float, dataset_size: int, world_size: int = 1) -> int:
    """k = max(1, min(floor(M * r), M)) as in the reference, rounded down to a multiple of the world size so the
    subset splits into equal, disjoint shards (never below one sample per rank)."""
    k = max(1, min(math.floor(dataset_size * ratio), dataset_size))
    return max(world_size, k - k % world_size)


def steps_for(num_samples: int, *, world_size: int, batch_size: int) -> int:
    """Optimizer steps of an epoch over ``num_samples``: each rank gets an equal shard, incomplete batches are
    dropped (static shapes)."""
    return (num_samples // world_size) // batch_size


def build_plan(
    *,
    max_epochs: int,
    dataset_size: int,
    batch_size: int,
    world_size: int = 1,
    strategy: str = "soft",
    ratio: RatioSchedule | None = None,
    interval: IntervalSchedule | None = None,
    total_cycles: int = 10,
    reselect_every_subset_epoch: bool | None = None,
) -> list[EpochPlan]:
    """Plan every epoch of a run.

    Args:
        max_epochs: Total epochs of the run (``trainer.max_epochs``); the plan has exactly this many.
        dataset_size: Training samples M.
        batch_size: Per-device batch size.
        world_size: Number of ranks (devices x nodes).
        strategy: ``none`` (full data every epoch), ``random``, ``hard`` or ``soft``.
        ratio: Subset-ratio schedule over cycles.
        interval: Subset-epoch schedule over cycles.
        total_cycles: Number of cycles T.
        reselect_every_subset_epoch: Re-draw before every subset epoch of a cycle, not only the first; defaults
            to True for ``soft`` (the reference's soft behaviour) and False otherwise.

    Raises:
        ValueError: Naming the key (``trainer.max_epochs``, ``selection.*``, ``ratio.*``, ``interval.*``) when the
            combination cannot be planned.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"selection.strategy: unknown {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if max_epochs < 1:
        raise ValueError(f"trainer.max_epochs: {max_epochs} must be >= 1")
    if dataset_size < world_size * batch_size:
        raise ValueError(
            f"data: {dataset_size} training samples cannot fill one batch of {batch_size} on each of {world_size} ranks"
        )
    full_steps = steps_for(
        dataset_size - dataset_size % world_size, world_size=world_size, batch_size=batch_size
    )

    def full(epoch: int, cycle: int | None) -> EpochPlan:
        return EpochPlan(
            epoch, "full", cycle, 1.0, dataset_size - dataset_size % world_size, full_steps, False
        )

    if strategy == "none":
        return [full(e, None) for e in range(max_epochs)]

    ratio = ratio or RatioSchedule()
    interval = interval or IntervalSchedule()
    if total_cycles < 1:
        raise ValueError(f"selection.total_cycles: {total_cycles} must be >= 1")
    if reselect_every_subset_epoch is None:
        reselect_every_subset_epoch = strategy == "soft"

    intervals = [interval(c, total_cycles) for c in range(total_cycles)]
    remaining = max_epochs - 1
    base, extra = divmod(remaining, total_cycles)
    lengths = [base + (1 if c >= total_cycles - extra else 0) for c in range(total_cycles)]
    short = [c for c in range(total_cycles) if lengths[c] < intervals[c]]
    if short:
        needed = 1 + _min_epochs_for(intervals)
        raise ValueError(
            f"trainer.max_epochs: {max_epochs} epochs cannot hold selection.total_cycles={total_cycles} cycles with "
            f"subset intervals {intervals} (cycle lengths would be {lengths}); use trainer.max_epochs>={needed}, "
            "fewer cycles or shorter intervals"
        )

    plan = [full(0, None)]
    for cycle in range(total_cycles):
        r = ratio(cycle, total_cycles)
        k = subset_size(r, dataset_size, world_size)
        steps = steps_for(k, world_size=world_size, batch_size=batch_size)
        if steps < 1:
            raise ValueError(
                f"ratio.initial: a subset of {k} samples (ratio {r:.3f} of {dataset_size}) gives no full batch of "
                f"{batch_size} per rank; raise the ratio or lower data.batch_size"
            )
        for i in range(lengths[cycle]):
            epoch = len(plan)
            if i < intervals[cycle]:
                reselect = i == 0 or reselect_every_subset_epoch
                plan.append(EpochPlan(epoch, "subset", cycle, r, k, steps, reselect))
            else:
                plan.append(full(epoch, cycle))
    assert len(plan) == max_epochs
    return plan


def _min_epochs_for(intervals: list[int]) -> int:
    """Smallest ``max_epochs - 1`` whose even split gives every cycle at least its interval."""
    total_cycles = len(intervals)
    remaining = sum(intervals)
    while True:
        base, extra = divmod(remaining, total_cycles)
        lengths = [base + (1 if c >= total_cycles - extra else 0) for c in range(total_cycles)]
        if all(length >= i for length, i in zip(lengths, intervals, strict=True)):
            return remaining
        remaining += 1


def plan_totals(plan: list[EpochPlan]) -> dict[str, int | float]:
    """Totals of a plan: steps, samples, subset epochs, and the sample fraction against full-data training."""
    full_samples = max(p.num_samples for p in plan) * len(plan)
    samples = sum(p.num_samples for p in plan)
    steps = sum(p.num_steps for p in plan)
    full_steps = max(p.num_steps for p in plan) * len(plan)
    return {
        "epochs": len(plan),
        "subset_epochs": sum(p.kind == "subset" for p in plan),
        "reselections": sum(p.reselect for p in plan),
        "optimizer_steps": sum(p.num_steps for p in plan),
        "samples": samples,
        "sample_fraction": samples / full_samples if full_samples else 1.0,
        # what is actually trained (incomplete batches are dropped), relative to full-data training
        "step_fraction": steps / full_steps if full_steps else 1.0,
    }
