"""Counter-based per-sample random numbers: exact SplitMix64, batch independence, distributions."""

import math

import torch

from attent_vision.models import counter_rng
from attent_vision.models.masking import generate_random_masks

M64 = (1 << 64) - 1


def _splitmix(z: int) -> int:
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_bits_equal_python_splitmix64_with_wrapping_arithmetic():
    # Large and negative seeds exercise int64 wrap-around and the logical shifts.
    seeds = [0, 1, 12345, (1 << 62) + 7, -3]
    counters = torch.tensor([0, 1, 2, 1000])
    bits = counter_rng.random_bits(torch.tensor(seeds), 3, counters)
    gamma = 0x9E3779B97F4A7C15
    for b, seed in enumerate(seeds):
        key = _splitmix(seed + 4 * gamma)
        for j, counter in enumerate(counters.tolist()):
            assert bits[b, j].item() == _splitmix(key + (counter + 1) * gamma) >> 1


def test_draws_depend_on_seed_purpose_and_counter_only():
    u = counter_rng.uniform(torch.tensor([5, 6, 7]), 0, torch.arange(10))
    v = counter_rng.uniform(torch.tensor([7]), 0, torch.arange(10))
    assert torch.equal(u[2], v[0])
    assert not torch.equal(u[0], u[1])
    assert not torch.equal(u, counter_rng.uniform(torch.tensor([5, 6, 7]), 1, torch.arange(10)))
    assert u.min() > 0 and u.max() < 1


def test_uniform_and_gamma_moments():
    seeds = torch.arange(20_000)
    u = counter_rng.uniform(seeds, 0, torch.arange(4))
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    for alpha in (0.3, 1.0, 4.0):
        draws = counter_rng.gamma(torch.full((20_000, 2), alpha), seeds, 2)
        se = math.sqrt(alpha / 20_000)
        assert abs(draws.mean().item() - alpha) < 5 * se, alpha  # Gamma(α, 1): mean α, variance α
        assert abs(draws.var().item() / alpha - 1) < 0.1, alpha
        assert (draws > 0).all()


def test_seeded_masks_are_uniform_over_tokens_and_shares_follow_dirichlet():
    counts = {"rgb": 16, "depth": 16, "semseg": 16}
    masks = generate_random_masks(
        counts, batch_size=6000, num_encoded_tokens=12, mask_seeds=torch.arange(6000)
    )
    kept = torch.stack([(1 - m).sum(1) for m in masks.task_masks.values()], dim=1).double()  # [B, T]
    assert (kept.sum(1) == 12).all()
    assert torch.allclose(
        kept.mean(0), torch.full((3,), 4.0).double(), atol=0.15
    )  # Dirichlet(1,1,1): E[λ_t] = 1/3
    # Dirichlet(1, 1, 1): Var(λ_t) = 2/36, so Var(kept_t) ≈ 144 · 2/36 = 8 (plus rounding)
    assert 7.0 < kept[:, 0].var().item() < 9.5
    visible = 1 - torch.cat(list(masks.task_masks.values()), dim=1).double()  # [B, 48]
    per_token = visible.mean(0)  # every token equally likely to be visible: 12/48
    assert torch.allclose(per_token, torch.full((48,), 0.25).double(), atol=0.03)


def test_seeded_masks_are_the_same_on_a_device_batch_of_any_size():
    counts = {"rgb": 9, "depth": 9}
    kwargs = dict(num_encoded_tokens=5, alphas=[0.5, 2.0], sample_tasks_uniformly=True)
    full = generate_random_masks(counts, batch_size=4, mask_seeds=torch.tensor([3, 1, 4, 1]), **kwargs)
    one = generate_random_masks(counts, batch_size=1, mask_seeds=torch.tensor([4]), **kwargs)
    assert torch.equal(full.ids_keep[2], one.ids_keep[0])
    assert torch.equal(full.ids_keep[1], full.ids_keep[3])
