"""Dirichlet multi-modal masking: budgets, per-task shares, seeds and variants."""

import pytest
import torch

from attent_vision.models.masking import (
    expand_alphas,
    generate_random_masks,
    ids_from_task_masks,
    sample_task_shares,
)

NUM_TOKENS = {"rgb": 16, "depth": 16, "semseg": 16}


def _kept(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([(1 - m).sum(1) for m in masks.values()], dim=1)  # [B, T]


@pytest.mark.parametrize("num_encoded", [1, 12, 30, 48])
def test_exactly_num_encoded_tokens_are_kept(num_encoded):
    g = torch.Generator().manual_seed(0)
    masks, ids_keep, ids_restore = generate_random_masks(
        NUM_TOKENS, batch_size=6, num_encoded_tokens=num_encoded, generator=g
    )
    assert ids_keep.shape == (6, num_encoded) and ids_restore.shape == (6, 48)
    assert _kept(masks).sum(1).tolist() == [num_encoded] * 6
    mask_all = torch.cat(list(masks.values()), dim=1)
    assert (mask_all.gather(1, ids_keep) == 0).all()  # ids_keep are exactly the visible tokens
    assert len(set(ids_keep[0].tolist())) == num_encoded
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(ids_shuffle[:, :num_encoded], ids_keep)  # ids_restore inverts the shuffle


def test_per_task_counts_follow_rounded_shares():
    seed, batch, n = 3, 32, 12
    shares = sample_task_shares(batch, 3, generator=torch.Generator().manual_seed(seed))
    masks, _, _ = generate_random_masks(
        NUM_TOKENS, batch_size=batch, num_encoded_tokens=n, generator=torch.Generator().manual_seed(seed)
    )
    diff = _kept(masks) - (shares * n).round().long()
    assert diff.abs().max() <= 1  # the ±1 rounding tie-break
    assert diff.abs().sum(1).max() <= 1  # with 3 tasks at most one token moves
    assert diff.abs().sum() > 0  # the seed exercises the rounding path


def test_mask_seeds_make_each_sample_a_function_of_its_seed():
    kwargs = dict(num_encoded_tokens=12, alphas=1.0)
    torch.manual_seed(1)
    a = generate_random_masks(NUM_TOKENS, batch_size=3, mask_seeds=torch.tensor([5, 6, 7]), **kwargs)
    torch.manual_seed(2)  # the global RNG must not matter
    b = generate_random_masks(NUM_TOKENS, batch_size=2, mask_seeds=torch.tensor([7, 5]), **kwargs)
    for task in NUM_TOKENS:
        assert torch.equal(a.task_masks[task][2], b.task_masks[task][0])
        assert torch.equal(a.task_masks[task][0], b.task_masks[task][1])
    assert torch.equal(a.ids_keep[2], b.ids_keep[0])
    many = generate_random_masks(NUM_TOKENS, batch_size=8, mask_seeds=torch.arange(8), **kwargs)
    flat = torch.cat(list(many.task_masks.values()), dim=1)
    assert len({tuple(row.tolist()) for row in flat}) == 8  # different seeds differ


def test_generator_and_global_rng_are_reproducible():
    def draw(**kw):
        return generate_random_masks(NUM_TOKENS, batch_size=4, num_encoded_tokens=10, **kw).ids_keep

    assert torch.equal(
        draw(generator=torch.Generator().manual_seed(9)), draw(generator=torch.Generator().manual_seed(9))
    )
    torch.manual_seed(4)
    first = draw()
    torch.manual_seed(4)
    assert torch.equal(first, draw())
    assert not torch.equal(first, draw())


def test_no_noise_variant_keeps_tokens_in_index_order():
    seed, batch, n = 0, 32, 12
    shares = sample_task_shares(batch, 3, generator=torch.Generator().manual_seed(seed))
    deficit = n - (shares * n).round().long().sum(1)  # [B], rounding deficit (>0) or surplus (<0)
    g = torch.Generator().manual_seed(seed)
    masks, ids_keep, _ = generate_random_masks(
        NUM_TOKENS, batch_size=batch, num_encoded_tokens=n, tie_break_noise=False, generator=g
    )
    assert _kept(masks).sum(1).tolist() == [n] * batch
    for b in range(batch):
        keep = ids_keep[b]
        if deficit[b] <= 0:  # selected tokens in index order; a surplus drops the highest indices
            assert torch.equal(keep, keep.sort().values)
        else:  # selected tokens in index order, then the deficit from the lowest masked indices
            d = int(deficit[b])
            assert torch.equal(keep[:-d], keep[:-d].sort().values)
            masked_before = sorted(set(range(48)) - set(keep[:-d].tolist()))[:d]
            assert keep[-d:].tolist() == masked_before
    assert (deficit != 0).any()  # the seed exercises the rounding path
    noisy = generate_random_masks(NUM_TOKENS, batch_size=batch, num_encoded_tokens=n, generator=g).ids_keep
    assert not torch.equal(noisy, noisy.sort(dim=1).values)  # the default tie-break shuffles the order


def test_sample_tasks_uniformly_leaves_tasks_nearly_empty():
    def near_empty_fraction(uniform: bool) -> float:
        masks, _, _ = generate_random_masks(
            NUM_TOKENS,
            batch_size=200,
            num_encoded_tokens=12,
            alphas=10.0,
            sample_tasks_uniformly=uniform,
            generator=torch.Generator().manual_seed(0),
        )
        return (_kept(masks).min(1).values <= 1).float().mean().item()

    # 6 of the 7 non-empty subsets leave at least one task out (concentration 1e-5 -> ~0 tokens).
    assert near_empty_fraction(True) > 0.7
    assert near_empty_fraction(False) < 0.05


def test_alphas_accept_int_and_per_task_lists():
    assert torch.equal(expand_alphas(1, 3), torch.ones(3))
    assert expand_alphas([0.5, 1, 2], 3).tolist() == [0.5, 1.0, 2.0]
    a = generate_random_masks(
        NUM_TOKENS, batch_size=4, num_encoded_tokens=10, alphas=1, mask_seeds=torch.arange(4)
    )
    b = generate_random_masks(
        NUM_TOKENS, batch_size=4, num_encoded_tokens=10, alphas=1.0, mask_seeds=torch.arange(4)
    )
    assert torch.equal(a.ids_keep, b.ids_keep)
    with pytest.raises(ValueError, match="entries"):
        expand_alphas([1.0, 1.0], 3)
    with pytest.raises(ValueError, match="positive"):
        expand_alphas(0.0, 3)


def test_num_encoded_tokens_out_of_range():
    for bad in (0, 49):
        with pytest.raises(ValueError, match="num_encoded_tokens"):
            generate_random_masks(NUM_TOKENS, batch_size=2, num_encoded_tokens=bad)


def test_user_masks_use_per_sample_count():
    counts = {"rgb": 3, "depth": 3}
    user = {"rgb": torch.tensor([[0, 1, 1], [1, 1, 0]]), "depth": torch.tensor([[1, 0, 1], [1, 0, 1]])}
    masks, ids_keep, ids_restore = ids_from_task_masks(user, counts)
    # 2 kept per sample, not the batch total 4 that the reference counts
    assert ids_keep.tolist() == [[0, 4], [2, 4]]
    assert torch.equal(masks["rgb"], user["rgb"])
    assert torch.equal(torch.argsort(ids_restore, 1)[:, :2], ids_keep)
    with pytest.raises(ValueError, match="same number"):
        ids_from_task_masks({"rgb": torch.tensor([[0, 0, 1], [1, 1, 0]]), "depth": user["depth"]}, counts)
    with pytest.raises(ValueError, match="missing"):
        ids_from_task_masks({"rgb": user["rgb"]}, counts)
