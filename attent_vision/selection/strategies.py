"""Subset selection rules over per-sample scores: random, hard (top-k) and soft (Gumbel-top-k).

Every rule is a pure function of (scores, k, generator) returning int64 indices, so all ranks that share the
scores and the generator seed select the identical subset. The Hydra-built selectors (``selectors.py``) wrap them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Normalization = Literal["softmax", "sigmoid"]


def select_random(scores: Tensor, k: int, *, generator: torch.Generator) -> Tensor:
    """k indices uniformly without replacement; scores are ignored (only their count matters)."""
    return torch.randperm(scores.numel(), generator=generator)[:k]


def top_k(keys: Tensor, k: int) -> Tensor:
    """Sorted int64 indices of the k largest ``keys``; among keys equal to the k-th largest, the lowest indices.

    One selection (``kthvalue``) and one pass instead of ``topk``'s partial sort and a sort of its result (hard
    selection over 1.28M scores: 53 -> 36 ms, ``bench/selection_cost.py``), and ties are broken the same way on
    every platform.
    """
    n = keys.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k={k} is outside [0, {n}]")
    if k == n:
        return torch.arange(n, dtype=torch.int64)
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    threshold = keys.kthvalue(n - k + 1).values  # the k-th largest
    chosen = keys > threshold
    missing = k - int(chosen.sum())
    if missing > 0:
        chosen[torch.nonzero(keys == threshold).squeeze(1)[:missing]] = True
    return torch.nonzero(chosen).squeeze(1)


def select_hard(scores: Tensor, k: int, *, generator: torch.Generator | None = None) -> Tensor:
    """The k highest-score (most difficult) samples (sorted indices; ties: the lowest indices)."""
    return top_k(scores.float(), k)


def log_weights(scores: Tensor, normalization: Normalization = "softmax") -> Tensor:
    """Log of the normalised selection weights: log softmax(s) or log sigmoid(s)."""
    scores = scores.double()
    if normalization == "softmax":
        return torch.log_softmax(scores, dim=0)
    if normalization == "sigmoid":
        return torch.nn.functional.logsigmoid(scores)
    raise ValueError(f"selection.normalization: unknown {normalization!r}; allowed: softmax, sigmoid")


def gumbel_noise(shape: torch.Size, *, generator: torch.Generator) -> Tensor:
    """Standard Gumbel(0, 1) noise drawn from ``generator`` (float64 to keep ties negligible at 10^6 samples)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return -torch.log(-torch.log(u.clamp_min(1e-300)))


def select_soft(
    scores: Tensor,
    k: int,
    *,
    generator: torch.Generator,
    temperature: float = 1.0,
    normalization: Normalization = "softmax",
) -> Tensor:
    """Gumbel-top-k: k samples without replacement, drawn in proportion to weights ``w^(1/temperature)``.

    The temperature scales the log-weights *before* the Gumbel noise is added (the reference divides after, where
    it cannot change a ranking). As temperature -> 0 this tends to :func:`select_hard`; as it grows, to
    :func:`select_random`.
    """
    if temperature <= 0:
        raise ValueError(f"selection.temperature: {temperature} must be > 0")
    keys = log_weights(scores, normalization) / temperature + gumbel_noise(scores.shape, generator=generator)
    return top_k(keys, k)
