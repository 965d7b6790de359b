"""Counter-based random numbers per sample, vectorised on any device: draw ``j`` of sample ``b`` is a pure
function of (``seeds[b]``, purpose, ``j``).

A per-sample ``torch.Generator`` makes every mask reproducible but costs a Python loop over the batch on the CPU
(bench/throughput.py's ``masks`` rows). Hashing the counter instead gives the same guarantee — a sample's draws
depend on its seed alone, not on the batch it is in or the device — as a handful of integer tensor ops on the
batch's device. The hash is SplitMix64 (a bijection of 64-bit integers with good avalanche), the finaliser
:mod:`attent_vision.seeds` defines once and uses for per-sample seeds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attent_vision.seeds import GAMMA, shift_right, splitmix64

__all__ = ["gamma", "random_bits", "uniform"]


_MAX_GAMMA_ROUNDS = 64


def random_bits(seeds: Tensor, purpose: int, counters: Tensor) -> Tensor:
    """63 random bits per (sample, counter): (B, *counters.shape) non-negative int64 on ``seeds``' device.

    Args:
        seeds: (B,) int64 per-sample seeds.
        purpose: Separates independent uses of one seed (token ranks, tie-break noise, ...).
        counters: Non-negative int64 counters; the same counter of the same seed and purpose gives the same bits.
    """
    seeds = seeds.long()
    key = splitmix64(seeds + torch.full_like(seeds, purpose + 1) * GAMMA)  # [B]
    key = key.reshape(-1, *([1] * counters.ndim))
    return shift_right(splitmix64(key + (counters.to(seeds.device).long() + 1) * GAMMA), 1)


def uniform(seeds: Tensor, purpose: int, counters: Tensor) -> Tensor:
    """U(0, 1) float64, never exactly 0 or 1, shaped like :func:`random_bits`."""
    return (shift_right(random_bits(seeds, purpose, counters), 10).double() + 0.5) * 2.0**-53


def gamma(concentration: Tensor, seeds: Tensor, purpose: int) -> Tensor:
    """Gamma(α, 1) draws (B, T) for concentrations α (B, T) > 0, element (b, t) a function of ``seeds[b]`` only.

    Marsaglia and Tsang's method (ACM TOMS 2000) with a Box–Muller normal; each round uses fresh counters and
    keeps the first accepted proposal per element (acceptance > 95% for α ≥ 1, so two or three rounds usually
    do). α < 1 draws Gamma(α + 1) · U^(1/α).
    """
    alpha = concentration.double()
    num_tasks = alpha.shape[1]
    boost = alpha < 1
    shape = torch.where(boost, alpha + 1, alpha)
    d = shape - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    task = torch.arange(num_tasks, device=seeds.device)
    result = torch.zeros_like(alpha)
    done = torch.zeros_like(alpha, dtype=torch.bool)
    for round_ in range(_MAX_GAMMA_ROUNDS):
        counters = (round_ * num_tasks + task) * 3  # [T]: three uniforms per task and round
        u1, u2, u3 = (uniform(seeds, purpose, counters + j) for j in range(3))  # [B, T] each
        normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        v = (1.0 + c * normal) ** 3
        log_v = torch.log(v.clamp_min(1e-300))
        accept = (v > 0) & (torch.log(u3) < 0.5 * normal**2 + d - d * v + d * log_v) & ~done
        result = torch.where(accept, d * v, result)
        done = done | accept
        if bool(done.all()):
            break
    else:  # practically unreachable: each round fails with probability < 5%
        raise RuntimeError(f"gamma sampling did not converge in {_MAX_GAMMA_ROUNDS} rounds")
    boost_u = uniform(seeds, purpose, _MAX_GAMMA_ROUNDS * num_tasks * 3 + task)  # [B, T]
    return torch.where(boost, result * boost_u ** (1.0 / alpha), result)
