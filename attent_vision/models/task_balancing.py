"""Task-loss balancers of MultiMAE pretraining. Build them from Hydra with ``_target_``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["NoTaskBalancer", "UncertaintyTaskBalancer"]


class NoTaskBalancer(nn.Module):
    """Returns the task losses unchanged (total = Σ_t L_t)."""

    def forward(self, task_losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Identity on {task: scalar loss}."""
        return dict(task_losses)


class UncertaintyTaskBalancer(nn.Module):
    """Homoscedastic-uncertainty weighting: exp(-s_t)·L_t + s_t, with learnable s_t initialised to 0.

    A task whose loss is exactly 0 (e.g. no masked patch in the batch) contributes 0. Log-variances are looked
    up by task name, so the dict order of the losses does not matter (the reference matched them by position).

    Args:
        tasks: Names of the balanced tasks; ``log_vars[i]`` belongs to ``tasks[i]``.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        if len(set(self.tasks)) != len(self.tasks) or not self.tasks:
            raise ValueError(f"tasks must be a non-empty list of unique names, got {self.tasks}")
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))

    def forward(self, task_losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Weights {task: scalar loss}; raises ValueError for a task it does not know."""
        unknown = [t for t in task_losses if t not in self.tasks]
        if unknown:
            raise ValueError(f"UncertaintyTaskBalancer got unknown task(s) {unknown}; known: {self.tasks}")
        weighted = {}
        for task, loss in task_losses.items():
            s = self.log_vars[self.tasks.index(task)]
            value = torch.exp(-s) * loss + s
            weighted[task] = torch.where(loss == 0, torch.zeros_like(value), value)
        return weighted
