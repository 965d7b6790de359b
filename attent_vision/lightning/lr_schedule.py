"""Per-step learning-rate schedule: linear warmup, then cosine decay that lands on ``min_lr`` at the last step."""

from __future__ import annotations

import math


def warmup_cosine_lr(
    step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup rises linearly to ``base_lr`` over ``warmup_steps`` steps, starting at ``base_lr / warmup_steps``
    rather than 0 so no step is wasted. The cosine then reaches ``min_lr`` exactly at step ``total_steps - 1``.
    Steps past the end stay at ``min_lr``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:  # no room to decay: the last step still lands on min_lr
        return min_lr if step >= total_steps - 1 else base_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
