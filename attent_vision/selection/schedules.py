"""Subset-ratio and re-selection-interval schedules over the teacher's cycles (reference formulas)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


def cycle_progress(cycle: int, total_cycles: int) -> float:
    """Progress p = c / (T - 1) in [0, 1]; a single cycle counts as finished (p = 1), as in the reference."""
    return 1.0 if total_cycles == 1 else cycle / (total_cycles - 1)


@dataclass(frozen=True)
class RatioSchedule:
    """Fraction of the training set selected in each cycle.

    Args:
        kind: ``constant`` (always ``initial``), ``cosine`` (slow-fast-slow growth) or ``incremental`` (linear).
        initial: Ratio of the first cycle, in (0, 1].
        final: Ratio of the last cycle, in [initial, 1].
    """

    kind: Literal["constant", "cosine", "incremental"] = "incremental"
    initial: float = 0.2
    final: float = 0.8

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "cosine", "incremental"):
            raise ValueError(
                f"ratio.kind: unknown schedule {self.kind!r}; allowed: constant, cosine, incremental"
            )
        if not 0 < self.initial <= 1:
            raise ValueError(f"ratio.initial: {self.initial} is outside (0, 1]")
        if not 0 < self.final <= 1:
            raise ValueError(f"ratio.final: {self.final} is outside (0, 1]")
        if self.kind != "constant" and self.final < self.initial:
            raise ValueError(f"ratio.final: {self.final} is below ratio.initial={self.initial}")

    def __call__(self, cycle: int, total_cycles: int) -> float:
        if self.kind == "constant":
            return self.initial
        p = cycle_progress(cycle, total_cycles)
        if self.kind == "cosine":
            p = (1 - math.cos(math.pi * p)) / 2
        ratio = self.initial + (self.final - self.initial) * p
        return min(max(ratio, self.initial), self.final)


@dataclass(frozen=True)
class IntervalSchedule:
    """Number of subset epochs trained after each re-selection.

    Args:
        kind: ``fixed`` (always ``initial``) or ``incremental`` (``initial + floor((max - initial) * p)``).
        initial: Interval of the first cycle, >= 1.
        max: Interval of the last cycle with ``incremental``.
    """

    kind: Literal["fixed", "incremental"] = "incremental"
    initial: int = 5
    max: int = 10

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "incremental"):
            raise ValueError(f"interval.kind: unknown schedule {self.kind!r}; allowed: fixed, incremental")
        if self.initial < 1:
            raise ValueError(f"interval.initial: {self.initial} must be >= 1")
        if self.kind == "incremental" and self.max < self.initial:
            raise ValueError(f"interval.max: {self.max} is below interval.initial={self.initial}")

    def __call__(self, cycle: int, total_cycles: int) -> int:
        if self.kind == "fixed":
            return self.initial
        if total_cycles == 1:  # p = 1, as in cycle_progress
            return self.max
        # Exact integer floor((max - initial) * c / (T - 1)); the float product can land just below an integer.
        return self.initial + (self.max - self.initial) * cycle // (total_cycles - 1)
