"""One float32 score per training sample, with the step at which it was measured."""

from __future__ import annotations

import torch
from torch import Tensor


class ScoreBank:
    """Per-sample difficulty scores, filled by a scoring pass or online from training losses.

    Args:
        num_samples: Size of the training set.
    """

    def __init__(self, num_samples: int) -> None:
        self.scores = torch.zeros(num_samples, dtype=torch.float32)
        # Global step at which each score was measured; -1 = never measured.
        self.measured_at = torch.full((num_samples,), -1, dtype=torch.int64)

    def __len__(self) -> int:
        return self.scores.numel()

    def update(self, indices: Tensor, scores: Tensor, *, step: int) -> None:
        """Write scores at int64 ``indices``; non-finite scores are rejected with the offending indices."""
        if indices.dtype != torch.int64:
            raise TypeError(
                f"indices must be int64, got {indices.dtype} (floats cannot hold large indices exactly)"
            )
        scores = scores.detach().float().cpu()
        indices = indices.detach().cpu()
        bad = ~torch.isfinite(scores)
        if bad.any():
            raise FloatingPointError(f"non-finite scores for samples {indices[bad][:10].tolist()}")
        self.scores[indices] = scores
        self.measured_at[indices] = step

    def filled(self) -> Tensor:
        """Scores with never-measured samples set to the mean of the measured ones (neutral, not favoured)."""
        known = self.measured_at >= 0
        if known.all() or not known.any():
            return self.scores.clone()
        out = self.scores.clone()
        out[~known] = self.scores[known].mean()
        return out

    def coverage(self) -> float:
        return float((self.measured_at >= 0).float().mean())

    def state_dict(self) -> dict[str, Tensor]:
        return {"scores": self.scores.clone(), "measured_at": self.measured_at.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        sizes = {state["scores"].numel(), state["measured_at"].numel()}
        if sizes != {len(self)}:
            raise ValueError(
                f"checkpoint scores cover {state['scores'].numel()} samples (measured_at "
                f"{state['measured_at'].numel()}) but the training set has {len(self)}"
            )
        self.scores = state["scores"].float().clone()
        self.measured_at = state["measured_at"].long().clone()
