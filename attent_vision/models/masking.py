"""Dirichlet multi-modal token masking, as in MultiMAE.

Per sample, task shares λ ~ Dirichlet(α) split a budget of ``num_encoded_tokens`` visible tokens between the
input tasks; each task keeps a uniformly random subset of round(λ_t · budget) tokens, and the ±1 rounding
surplus or deficit is resolved by a random tie-break (the MultiMAE reference; ``tie_break_noise=False`` gives the
AtteNT fork's variant, which resolves it towards low indices). The encoder always sees exactly
``num_encoded_tokens``. :class:`MaskingConfig` holds these settings; a MultiMAE owns one.

Randomness comes, in order of precedence, from per-sample seeds (``mask_seeds``: sample b's mask is a pure
function of ``mask_seeds[b]``, drawn by counter-based hashing on the batch's device), an explicit ``generator``, or torch's global RNG (same draw order as the
reference). Masks use 1 = masked, 0 = visible.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from attent_vision.models import counter_rng

__all__ = [
    "MaskingConfig",
    "TokenMasks",
    "expand_alphas",
    "generate_random_masks",
    "ids_from_task_masks",
    "sample_task_shares",
]

Alphas = float | int | Sequence[float]


@dataclass(frozen=True)
class MaskingConfig:
    """How MultiMAE masks its input tokens (see :func:`generate_random_masks`).

    Args:
        num_encoded_tokens: Visible tokens per sample given to the encoder (MultiMAE-B: 98 of 588 at 224 px).
        alphas: Dirichlet concentration of the per-sample task shares, one value or one per input task (lower =
            less even shares).
        sample_tasks_uniformly: Pick a random non-empty subset of the input tasks per sample first; the others
            get (almost) no visible tokens.
        tie_break_noise: Resolve the rounding of the shares at random (the MultiMAE reference); False keeps the
            visible tokens in index order (the AtteNT fork, a small positional bias).
    """

    num_encoded_tokens: int = 98
    alphas: Alphas = 1.0
    sample_tasks_uniformly: bool = False
    tie_break_noise: bool = True

    def __post_init__(self) -> None:
        if (
            isinstance(self.num_encoded_tokens, bool)
            or int(self.num_encoded_tokens) != self.num_encoded_tokens
        ):
            raise ValueError(f"num_encoded_tokens must be an integer, got {self.num_encoded_tokens!r}")
        if self.num_encoded_tokens < 1:
            raise ValueError(f"num_encoded_tokens must be >= 1, got {self.num_encoded_tokens}")
        object.__setattr__(self, "num_encoded_tokens", int(self.num_encoded_tokens))
        if not isinstance(self.alphas, numbers.Real):
            # A list (or Hydra ListConfig) becomes a tuple: the config stays immutable and hashable.
            object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        values = [self.alphas] if isinstance(self.alphas, numbers.Real) else self.alphas
        if not values or any(a <= 0 for a in values):
            raise ValueError(f"Dirichlet alphas must be positive, got {self.alphas!r}")


class TokenMasks(NamedTuple):
    """Masks of one batch.

    Attributes:
        task_masks: {task: (B, N_t)} with 1 = masked, in task order.
        ids_keep: (B, num_encoded) indices of visible tokens in the concatenated sequence.
        ids_restore: (B, N_total) permutation that unshuffles [visible, masked] back to task order.
    """

    task_masks: dict[str, Tensor]
    ids_keep: Tensor
    ids_restore: Tensor


def expand_alphas(alphas: Alphas, num_tasks: int) -> Tensor:
    """Turns a scalar (float or int) or per-task list of Dirichlet concentrations into a (T,) float tensor."""
    if isinstance(alphas, numbers.Real) or (isinstance(alphas, Tensor) and alphas.ndim == 0):
        values = [float(alphas)] * num_tasks
    else:
        values = [float(a) for a in alphas]
        if len(values) != num_tasks:
            raise ValueError(f"alphas has {len(values)} entries but there are {num_tasks} input tasks")
    if any(a <= 0 for a in values):
        raise ValueError(f"Dirichlet alphas must be positive, got {values}")
    return torch.tensor(values, dtype=torch.float32)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | None) -> Tensor:
    """U(0, 1) noise from ``generator`` (on its device, then moved) or from the global RNG on ``device``."""
    if generator is None:
        return torch.rand(shape, device=device)
    noise = torch.rand(shape, generator=generator, device=generator.device)
    return noise if device is None else noise.to(device)


def sample_task_shares(
    batch_size: int,
    num_tasks: int,
    *,
    alphas: Alphas = 1.0,
    sample_tasks_uniformly: bool = False,
    generator: torch.Generator | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Samples per-sample task shares λ on the simplex.

    Args:
        batch_size: Number of samples B.
        num_tasks: Number of input tasks T.
        alphas: Dirichlet concentration, scalar or one per task (lower = less uniform shares).
        sample_tasks_uniformly: First pick one of the 2^T - 1 non-empty task subsets uniformly per sample;
            chosen tasks get concentration α, the others ``eps``.
        generator: Source of randomness; None uses the global RNG.
        eps: Concentration of the tasks left out by ``sample_tasks_uniformly``.

    Returns:
        (B, T) float32 shares on the generator's device (CPU for the global RNG).
    """
    alpha = expand_alphas(alphas, num_tasks)  # [T]
    device = generator.device if generator is not None else torch.device("cpu")
    alpha = alpha.to(device)
    if sample_tasks_uniformly:
        subsets = torch.tensor(list(itertools.product([0.0, 1.0], repeat=num_tasks))[1:], device=device)
        choice = torch.randint(0, len(subsets), (batch_size,), generator=generator, device=device)  # [B]
        concentration = subsets[choice] * alpha + eps  # [B, T]
    else:
        concentration = alpha.expand(batch_size, num_tasks).contiguous()  # [B, T]
    # Same kernel as torch.distributions.Dirichlet.sample, but it accepts a generator.
    return torch._sample_dirichlet(concentration, generator=generator)


def _draw_keep_order(
    num_tokens: Sequence[int],
    batch_size: int,
    num_encoded_tokens: int,
    *,
    alphas: Alphas,
    sample_tasks_uniformly: bool,
    tie_break_noise: bool,
    generator: torch.Generator | None,
    device: torch.device | None,
) -> Tensor:
    """Draws shares and per-task subsets; returns ids_shuffle [B, N_total] (visible tokens first)."""
    shares = sample_task_shares(
        batch_size,
        len(num_tokens),
        alphas=alphas,
        sample_tasks_uniformly=sample_tasks_uniformly,
        generator=generator,
    )  # [B, T]
    if device is not None:
        shares = shares.to(device)
    samples_per_task = (shares * num_encoded_tokens).round().long()  # [B, T]

    task_masks = []
    for t, n in enumerate(num_tokens):
        # Token j of a random permutation rank π(j) is kept iff π(j) < n_t: a uniform subset of size n_t.
        rank = torch.argsort(_rand((batch_size, n), generator, device), dim=1)  # [B, N_t]
        task_masks.append((rank >= samples_per_task[:, t : t + 1]).long())
    mask_all = torch.cat(task_masks, dim=1)  # [B, N_total]

    if tie_break_noise:
        return torch.argsort(mask_all + _rand(tuple(mask_all.shape), generator, device), dim=1)
    return torch.argsort(mask_all, dim=1, stable=True)  # AtteNT fork: visible tokens in index order


# Purposes of a sample's counter-based draws (attent_vision.models.counter_rng).
_SUBSET, _SHARES, _TOKEN_RANK, _TIE_BREAK = 1, 2, 3, 4


def _draw_keep_order_seeded(
    num_tokens: Sequence[int],
    seeds: Tensor,
    num_encoded_tokens: int,
    *,
    alphas: Alphas,
    sample_tasks_uniformly: bool,
    tie_break_noise: bool,
) -> Tensor:
    """Like :func:`_draw_keep_order`, every draw of sample b hashed from ``seeds[b]`` on ``seeds``' device;
    returns ids_keep [B, num_encoded_tokens] (visible before masked, ties by noise)."""
    batch_size, num_tasks = seeds.shape[0], len(num_tokens)
    device = seeds.device
    alpha = expand_alphas(alphas, num_tasks).to(device).double().expand(batch_size, num_tasks)  # [B, T]
    if sample_tasks_uniformly:
        subsets = torch.tensor(list(itertools.product([0.0, 1.0], repeat=num_tasks))[1:], device=device)
        bits = counter_rng.random_bits(seeds, _SUBSET, torch.zeros(1, dtype=torch.long))[:, 0]  # [B]
        alpha = subsets[bits % len(subsets)].double() * alpha + 1e-5  # [B, T]
    draws = counter_rng.gamma(alpha, seeds, _SHARES)  # [B, T]
    shares = (draws / draws.sum(dim=1, keepdim=True)).float()
    samples_per_task = (shares * num_encoded_tokens).round().long()  # [B, T]

    offsets = torch.tensor([0, *itertools.accumulate(num_tokens)], device=device)
    task_masks = []
    for t, n in enumerate(num_tokens):
        # argsort of n random 63-bit keys is a uniform permutation, as argsort of uniform noise is.
        keys = counter_rng.random_bits(seeds, _TOKEN_RANK, offsets[t] + torch.arange(n, device=device))
        rank = torch.argsort(keys, dim=1)  # [B, N_t]
        task_masks.append((rank >= samples_per_task[:, t : t + 1]).long())
    mask_all = torch.cat(task_masks, dim=1)  # [B, N_total]
    # The rounding surplus or deficit is resolved by ranking visible before masked tokens, then by noise (or by
    # index for the fork's variant); only the first num_encoded_tokens are needed: a top-k, not a full sort.
    order = torch.arange(mask_all.shape[1], device=device).expand_as(mask_all)
    if tie_break_noise:
        order = (
            counter_rng.random_bits(seeds, _TIE_BREAK, order[0]) >> 2
        )  # 61 bits below the mask bit at 2^62
    ids_keep = torch.topk(mask_all * (1 << 62) + order, num_encoded_tokens, dim=1, largest=False).indices
    return ids_keep  # [B, num_encoded]


def _masks_from_keep(ids_keep: Tensor, task_names: Sequence[str], num_tokens: Sequence[int]) -> TokenMasks:
    """TokenMasks whose shuffle puts ``ids_keep`` first and the masked tokens after them in index order, built by
    scatters and a cumulative sum (no sort over the whole sequence)."""
    batch_size, num_keep = ids_keep.shape
    device = ids_keep.device
    visible = torch.zeros(batch_size, sum(num_tokens), dtype=torch.bool, device=device)
    visible.scatter_(1, ids_keep, True)  # [B, N_total]
    keep_position = torch.zeros(visible.shape, dtype=torch.long, device=device)
    keep_position.scatter_(1, ids_keep, torch.arange(num_keep, device=device).expand_as(ids_keep))
    masked_position = num_keep + torch.cumsum(~visible, dim=1) - 1
    ids_restore = torch.where(visible, keep_position, masked_position)  # [B, N_total]
    mask_all = (~visible).long()
    task_masks = dict(zip(task_names, torch.split(mask_all, list(num_tokens), dim=1), strict=True))
    return TokenMasks(task_masks, ids_keep, ids_restore)


def _finalise(
    ids_shuffle: Tensor, num_encoded_tokens: int, task_names: Sequence[str], num_tokens: Sequence[int]
):
    """Keeps the first ``num_encoded_tokens`` of ids_shuffle and rebuilds the binary task masks."""
    # The inverse permutation by a scatter: O(N) where an argsort is O(N log N) (the largest cost of a mask).
    positions = torch.arange(ids_shuffle.shape[1], device=ids_shuffle.device).expand_as(ids_shuffle)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, positions)  # [B, N_total]
    ids_keep = ids_shuffle[:, :num_encoded_tokens]  # [B, num_encoded]
    mask_all = torch.ones_like(ids_shuffle)
    mask_all[:, :num_encoded_tokens] = 0
    mask_all = torch.gather(mask_all, 1, ids_restore)  # [B, N_total] in task order
    task_masks = dict(zip(task_names, torch.split(mask_all, list(num_tokens), dim=1), strict=True))
    return TokenMasks(task_masks, ids_keep, ids_restore)


def generate_random_masks(
    num_tokens: Mapping[str, int],
    *,
    batch_size: int,
    num_encoded_tokens: int,
    alphas: Alphas = 1.0,
    sample_tasks_uniformly: bool = False,
    tie_break_noise: bool = True,
    mask_seeds: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TokenMasks:
    """Samples Dirichlet multi-task masks keeping exactly ``num_encoded_tokens`` tokens per sample.

    Args:
        num_tokens: Ordered {task: N_t}; this order is the token order of the sequence.
        batch_size: Number of samples B.
        num_encoded_tokens: Visible tokens per sample, 1 <= n <= Σ N_t.
        alphas: Dirichlet concentration, scalar (float or int) or one per task.
        sample_tasks_uniformly: Pick a random non-empty task subset first (see ``sample_task_shares``).
        tie_break_noise: Resolve the rounding surplus/deficit at random (the MultiMAE reference); False keeps
            visible tokens in index order (the AtteNT fork, a small positional bias).
        mask_seeds: Optional int64 (B,) seeds; every draw of sample b is then hashed from ``mask_seeds[b]``
            (counter-based, vectorised on ``device``: no per-sample generator), independent of the rest of the
            batch and of the device. Takes precedence over ``generator``.
        generator: Optional generator for the whole batch; None uses the global RNG.
        device: Device of the returned tensors.

    Returns:
        TokenMasks(task_masks, ids_keep, ids_restore).
    """
    names, counts = list(num_tokens), [int(n) for n in num_tokens.values()]
    total = sum(counts)
    if not names:
        raise ValueError("generate_random_masks needs at least one input task")
    if not 1 <= num_encoded_tokens <= total:
        raise ValueError(
            f"num_encoded_tokens must be in [1, {total}] (total input tokens), got {num_encoded_tokens}"
        )
    device = torch.device(device) if device is not None else None
    kwargs = dict(
        num_encoded_tokens=num_encoded_tokens,
        alphas=alphas,
        sample_tasks_uniformly=sample_tasks_uniformly,
        tie_break_noise=tie_break_noise,
    )
    if mask_seeds is not None:
        seeds = torch.as_tensor(mask_seeds).reshape(-1).long()
        if len(seeds) != batch_size:
            raise ValueError(f"mask_seeds has {len(seeds)} entries for a batch of {batch_size}")
        ids_keep = _draw_keep_order_seeded(counts, seeds.to(device or seeds.device), **kwargs)
        return _masks_from_keep(ids_keep, names, counts)
    else:
        ids_shuffle = _draw_keep_order(counts, batch_size, generator=generator, device=device, **kwargs)
    return _finalise(ids_shuffle, num_encoded_tokens, names, counts)


def ids_from_task_masks(task_masks: Mapping[str, Tensor], num_tokens: Mapping[str, int]) -> TokenMasks:
    """Builds ids_keep/ids_restore from user-given masks (1 = masked).

    Unlike the reference, which counts the kept tokens over the whole batch (so with B > 1 its ids_keep also
    takes masked tokens), the number of kept tokens is counted per sample; it must be equal across the batch, since the encoder
    input is a dense (B, n, D) tensor.

    Args:
        task_masks: {task: (B, N_t)} masks for every task in ``num_tokens``.
        num_tokens: Ordered {task: N_t} of the encoded tasks.

    Returns:
        TokenMasks with the given masks (as int64), ids_keep (visible tokens in index order) and ids_restore.
    """
    missing = [t for t in num_tokens if t not in task_masks]
    if missing:
        raise ValueError(f"task_masks is missing the input task(s) {missing}; given {sorted(task_masks)}")
    masks = {}
    for task, n in num_tokens.items():
        mask = torch.as_tensor(task_masks[task])
        if mask.ndim != 2 or mask.shape[1] != n:
            raise ValueError(f"{task}: mask must have shape (B, {n}), got {tuple(mask.shape)}")
        masks[task] = (mask != 0).long()
    mask_all = torch.cat(list(masks.values()), dim=1)  # [B, N_total]
    kept = (mask_all == 0).sum(dim=1)  # [B]
    if kept.numel() == 0 or bool((kept != kept[0]).any()):
        raise ValueError(
            f"task_masks must keep the same number of tokens in every sample, got {kept.tolist()}"
        )
    num_kept = int(kept[0])
    if num_kept < 1:
        raise ValueError("task_masks leave no visible token")
    ids_shuffle = torch.argsort(mask_all, dim=1, stable=True)  # [B, N_total]
    return TokenMasks(masks, ids_shuffle[:, :num_kept], torch.argsort(ids_shuffle, dim=1))
