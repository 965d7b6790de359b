"""The epoch plan: for every epoch, full or subset, its cycle, ratio, samples, steps and re-selections.

Plans are pure functions of the run's shape (:class:`PlanRequest`) and the keys of the selector that asks for
them, printable before any training:

* :func:`full_data_plan` — every epoch on the whole set (the baseline).
* :func:`cycle_plan` — AtteNT (the reference's structure, no epoch dropped): one initial full epoch, then
  ``total_cycles`` cycles; each re-selects a subset, trains ``interval`` epochs on it, then full epochs until the
  cycle ends. The ``max_epochs - 1`` epochs after the first are shared out as evenly as possible; the later
  cycles (whose intervals are longest) get the remainder.

An entry may be *estimated* when its size depends on scores not known yet (InfoBatch prunes a share of the
below-mean samples): :func:`resolve_estimate` fixes it when its epoch is selected, and carries the realised size
over to the later estimated entries as their new estimate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from attent_vision.selection.schedules import IntervalSchedule, RatioSchedule

Reselect = Literal["cycle", "every"]


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch does.

    ``cycle`` is None for epochs outside any cycle (the first, and every epoch of a strategy without cycles);
    ``reselect`` says that a subset is drawn (and scores refreshed if the scorer wants) before the epoch starts;
    ``estimated`` says that ``num_samples`` / ``num_steps`` are an estimate until the epoch is selected.
    """

    epoch: int
    kind: Literal["full", "subset"]
    cycle: int | None
    ratio: float
    num_samples: int
    num_steps: int
    reselect: bool
    estimated: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.estimated:  # the printed plan of exact plans keeps its seven keys
            del out["estimated"]
        return out


@dataclass(frozen=True)
class PlanRequest:
    """The run's shape that every plan is built from.

    Args:
        max_epochs: Total epochs of the run (``trainer.max_epochs``); a plan has exactly this many.
        dataset_size: Training samples M.
        batch_size: Per-device batch size.
        world_size: Number of ranks (devices x nodes).
        accumulate: Batches per optimizer step (``trainer.accumulate_grad_batches``): a step trains on
            ``batch_size x world_size x accumulate`` samples, and an epoch's steps count whole windows only.
    """

    max_epochs: int
    dataset_size: int
    batch_size: int
    world_size: int = 1
    accumulate: int = 1

    def __post_init__(self) -> None:
        if self.max_epochs < 1:
            raise ValueError(f"trainer.max_epochs: {self.max_epochs} must be >= 1")
        check_accumulation(self.accumulate)
        if self.dataset_size < self.world_size * self.batch_size * self.accumulate:
            raise ValueError(
                f"data: {self.dataset_size} training samples cannot fill one optimizer step of {self.accumulate} "
                f"batch(es) of {self.batch_size} on each of {self.world_size} ranks"
                if self.accumulate > 1
                else f"data: {self.dataset_size} training samples cannot fill one batch of {self.batch_size} on "
                f"each of {self.world_size} ranks"
            )

    @property
    def full_samples(self) -> int:
        """Samples of a full epoch: the whole set, less ``M mod W`` so that every rank gets an equal shard."""
        return self.dataset_size - self.dataset_size % self.world_size

    def steps(self, num_samples: int) -> int:
        return steps_for(
            num_samples, world_size=self.world_size, batch_size=self.batch_size, accumulate=self.accumulate
        )

    def full_epoch(self, epoch: int, cycle: int | None = None) -> EpochPlan:
        samples = self.full_samples
        return EpochPlan(epoch, "full", cycle, 1.0, samples, self.steps(samples), False)

    def subset_epoch(
        self, epoch: int, cycle: int | None, num_samples: int, *, reselect: bool, estimated: bool = False
    ) -> EpochPlan:
        ratio = num_samples / self.dataset_size
        return EpochPlan(
            epoch, "subset", cycle, ratio, num_samples, self.steps(num_samples), reselect, estimated
        )


def subset_size(ratio: float, dataset_size: int, world_size: int = 1) -> int:
    """k = max(1, min(floor(M * r), M)) as in the reference, rounded down to a multiple of the world size so the
    subset splits into equal, disjoint shards (never below one sample per rank)."""
    k = max(1, min(math.floor(dataset_size * ratio), dataset_size))
    return max(world_size, k - k % world_size)


def steps_for(num_samples: int, *, world_size: int, batch_size: int, accumulate: int = 1) -> int:
    """Optimizer steps of an epoch over ``num_samples``: each rank gets an equal shard, incomplete batches are
    dropped (static shapes), and so are incomplete accumulation windows of ``accumulate`` batches (the sampler
    yields whole windows only), so ``batch_size=B, accumulate=1`` and ``batch_size=B/2, accumulate=2`` plan the
    same steps on the same samples."""
    return (num_samples // world_size) // (batch_size * accumulate)


def check_accumulation(accumulate: object) -> int:
    """``trainer.accumulate_grad_batches`` as an int >= 1, or a ValueError naming the key."""
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches: {accumulate!r} must be an integer >= 1 (batches per optimizer step)"
        )
    return accumulate


def full_data_plan(request: PlanRequest) -> list[EpochPlan]:
    """Every epoch on the whole training set."""
    return [request.full_epoch(e) for e in range(request.max_epochs)]


def cycle_plan(
    request: PlanRequest,
    *,
    ratio: RatioSchedule,
    interval: IntervalSchedule,
    total_cycles: int,
    reselect: Reselect,
) -> list[EpochPlan]:
    """AtteNT's plan: one full epoch, then ``total_cycles`` cycles of subset epochs followed by full epochs.

    Args:
        request: The run's shape.
        ratio: Subset-ratio schedule over cycles.
        interval: Subset-epoch schedule over cycles.
        total_cycles: Number of cycles T.
        reselect: ``cycle`` draws a subset before the first subset epoch of a cycle only; ``every`` before each.

    Raises:
        ValueError: Naming the key (``trainer.max_epochs``, ``selection.*``, ``ratio.*``) when the combination
            cannot be planned.
    """
    if total_cycles < 1:
        raise ValueError(f"selection.total_cycles: {total_cycles} must be >= 1")
    if reselect not in ("cycle", "every"):
        raise ValueError(f"selection.reselect: unknown {reselect!r}; allowed: cycle, every")
    intervals = [interval(c, total_cycles) for c in range(total_cycles)]
    lengths = _cycle_lengths(request.max_epochs - 1, total_cycles)
    if any(length < i for length, i in zip(lengths, intervals, strict=True)):
        needed = 1 + _min_epochs_for(intervals)
        raise ValueError(
            f"trainer.max_epochs: {request.max_epochs} epochs cannot hold selection.total_cycles={total_cycles} "
            f"cycles with subset intervals {intervals} (cycle lengths would be {lengths}); use "
            f"trainer.max_epochs>={needed}, fewer cycles or shorter intervals"
        )

    plan = [request.full_epoch(0)]
    for cycle in range(total_cycles):
        r = ratio(cycle, total_cycles)
        k = subset_size(r, request.dataset_size, request.world_size)
        if request.steps(k) < 1:
            raise ValueError(
                f"ratio.initial: a subset of {k} samples (ratio {r:.3f} of {request.dataset_size}) gives no full "
                f"{_step_unit(request)} per rank; raise the ratio or lower data.batch_size"
            )
        for i in range(lengths[cycle]):
            epoch = len(plan)
            if i < intervals[cycle]:
                entry = request.subset_epoch(epoch, cycle, k, reselect=i == 0 or reselect == "every")
                plan.append(replace(entry, ratio=r))  # the scheduled ratio, not k / M after rounding
            else:
                plan.append(request.full_epoch(epoch, cycle))
    assert len(plan) == request.max_epochs
    return plan


def build_plan(
    *,
    max_epochs: int,
    dataset_size: int,
    batch_size: int,
    world_size: int = 1,
    accumulate: int = 1,
    ratio: RatioSchedule | None = None,
    interval: IntervalSchedule | None = None,
    total_cycles: int = 10,
    reselect: Reselect = "cycle",
) -> list[EpochPlan]:
    """:func:`cycle_plan` with keyword arguments and the default schedules (for scripts and tests)."""
    return cycle_plan(
        PlanRequest(max_epochs, dataset_size, batch_size, world_size, accumulate),
        ratio=ratio or RatioSchedule(),
        interval=interval or IntervalSchedule(),
        total_cycles=total_cycles,
        reselect=reselect,
    )


def _step_unit(request: PlanRequest) -> str:
    if request.accumulate == 1:
        return f"batch of {request.batch_size}"
    return f"optimizer step ({request.accumulate} batches of {request.batch_size})"


def _cycle_lengths(remaining: int, total_cycles: int) -> list[int]:
    base, extra = divmod(remaining, total_cycles)
    return [base + (1 if c >= total_cycles - extra else 0) for c in range(total_cycles)]


def _min_epochs_for(intervals: list[int]) -> int:
    """Smallest ``max_epochs - 1`` whose even split gives every cycle at least its interval."""
    remaining = sum(intervals)
    while any(n < i for n, i in zip(_cycle_lengths(remaining, len(intervals)), intervals, strict=True)):
        remaining += 1
    return remaining


def first_reselection_of_cycle(plan: list[EpochPlan], epoch: int) -> bool:
    """Whether ``epoch`` is the first re-selection of its cycle (always true outside cycles)."""
    cycle = plan[epoch].cycle
    return cycle is None or not any(p.reselect and p.cycle == cycle for p in plan[:epoch])


def resolve_estimate(
    plan: list[EpochPlan], epoch: int, num_samples: int, request: PlanRequest
) -> list[EpochPlan]:
    """The plan with ``epoch`` fixed at ``num_samples``; later estimated epochs take that size as their estimate.

    Raises:
        ValueError: If the realised size gives no full batch per rank.
    """
    if request.steps(num_samples) < 1:
        raise ValueError(
            f"epoch {epoch}: {num_samples} selected samples give no full {_step_unit(request)} per rank"
        )
    out = list(plan)
    out[epoch] = _resized(plan[epoch], num_samples, request, estimated=False)
    for later in range(epoch + 1, len(out)):
        if out[later].estimated:
            out[later] = _resized(out[later], num_samples, request, estimated=True)
    return out


def _resized(entry: EpochPlan, num_samples: int, request: PlanRequest, *, estimated: bool) -> EpochPlan:
    return request.subset_epoch(
        entry.epoch, entry.cycle, num_samples, reselect=entry.reselect, estimated=estimated
    )


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
        "optimizer_steps": steps,
        "samples": samples,
        "sample_fraction": samples / full_samples if full_samples else 1.0,
        # what is actually trained (incomplete batches are dropped), relative to full-data training
        "step_fraction": steps / full_steps if full_steps else 1.0,
    }
