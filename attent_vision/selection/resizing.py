"""Keeping a step-based LR schedule exact when the plan's step count is only known as training goes.

InfoBatch's pruned epochs get their exact length when their scores are known. A schedule sized for the first
estimate would then end too early or too late. :class:`StepRemap` maps each optimizer step to a *position* on a
schedule built once for ``planned_total`` steps: until a resize, position = step (so fixed plans are untouched);
after ``resize(total, at_step=s)`` the positions still ahead are spread evenly over the steps still ahead. Every
step gets its own, increasing position, the LR stays continuous, and the last step of the run lands on the
schedule's last position (``min_lr``) exactly, since the plan is exact by the time its last epoch starts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepRemap:
    """Step -> schedule position for a schedule of ``planned_total`` positions.

    Args:
        planned_total: Steps the schedule was built for (its positions run from 0 to ``planned_total - 1``).
    """

    planned_total: int
    total: int = 0
    anchor_step: int = 0
    anchor_position: float = 0.0

    def __post_init__(self) -> None:
        if self.planned_total < 1:
            raise ValueError(f"planned_total must be >= 1, got {self.planned_total}")
        self.total = self.total or self.planned_total

    def position(self, step: int) -> float:
        """Schedule position of optimizer step ``step`` (0-based)."""
        if self.total == self.planned_total and self.anchor_step == 0:
            return float(step)  # never resized: the identity, bit for bit
        steps_left = self.total - 1 - self.anchor_step
        positions_left = self.planned_total - 1 - self.anchor_position
        if steps_left <= 0:
            return float(self.planned_total - 1)
        return self.anchor_position + (step - self.anchor_step) * positions_left / steps_left

    def resize(self, total: int, *, at_step: int) -> None:
        """The run now has ``total`` steps; steps before ``at_step`` keep their positions."""
        if total < 1:
            raise ValueError(f"total must be >= 1, got {total}")
        if total == self.total:
            return
        self.anchor_position = self.position(at_step)
        self.anchor_step = at_step
        self.total = total
