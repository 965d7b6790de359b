"""SubsetSampler (sharding, per-epoch reshuffle, rank-independent order) and ScoreBank (exact indices)."""

from __future__ import annotations

import pytest
import torch

from attent_vision.data.sampler import SubsetSampler
from attent_vision.selection.score_bank import ScoreBank

# ---------------------------------------------------------------------------------------------------------------
# SubsetSampler
# ---------------------------------------------------------------------------------------------------------------


def _ranks(num_samples: int, world: int, seed: int = 3, pool: torch.Tensor | None = None, epoch: int = 0):
    samplers = [SubsetSampler(num_samples, seed=seed, num_replicas=world, rank=r) for r in range(world)]
    for s in samplers:
        if pool is not None:
            s.set_pool(pool)
        s.set_epoch(epoch)
    return samplers


def _pool(num_samples: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))[:size].sort().values


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("pool_size", [12, 37, 60, 61, 99])
@pytest.mark.parametrize("epoch", [0, 5])
def test_shards_are_equal_disjoint_and_cover_the_pool(world: int, pool_size: int, epoch: int) -> None:
    pool = _pool(100, pool_size)
    samplers = _ranks(100, world, pool=pool, epoch=epoch)

    # Every rank computes the same global order: the rank never enters the shuffle (else shards overlap).
    orders = [s.epoch_order() for s in samplers]
    assert all(torch.equal(orders[0], o) for o in orders[1:])
    assert orders[0].dtype == torch.int64

    shards = [list(iter(s)) for s in samplers]
    expected_len = pool_size // world
    for s, shard in zip(samplers, shards, strict=True):
        assert len(s) == expected_len
        assert len(shard) == expected_len
        assert all(isinstance(i, int) for i in shard)
        assert shard == s.shard().tolist()
        assert shard == orders[0][s.rank :: world].tolist()

    flat = [i for shard in shards for i in shard]
    assert len(set(flat)) == len(flat)  # pairwise disjoint, no duplicates inside a shard
    assert set(flat) <= set(pool.tolist())
    missing = set(pool.tolist()) - set(flat)
    if pool_size % world == 0:
        assert not missing
    else:
        assert len(missing) == pool_size % world < world


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_full_set_sharding(world: int) -> None:
    samplers = _ranks(103, world)
    flat = [i for s in samplers for i in s]
    assert len(flat) == len(set(flat)) == world * (103 // world)
    assert set(flat) <= set(range(103))
    assert 103 - len(flat) == 103 % world


def test_set_epoch_reshuffles_and_same_epoch_reproduces() -> None:
    """Each epoch reshuffles (the original code never called set_epoch, so every full epoch had one order)."""
    sampler = SubsetSampler(200, seed=7)
    sampler.set_epoch(0)
    e0 = list(sampler)
    sampler.set_epoch(1)
    e1 = list(sampler)
    sampler.set_epoch(2)
    e2 = list(sampler)
    assert sorted(e0) == sorted(e1) == sorted(e2) == list(range(200))
    assert e0 != e1
    assert e1 != e2
    assert e0 != e2
    sampler.set_epoch(1)
    assert list(sampler) == e1
    # Iterating twice in an epoch gives the same order (no hidden state advanced by iteration).
    assert list(sampler) == e1
    # A freshly built sampler (e.g. after a resume) reproduces the epoch.
    fresh = SubsetSampler(200, seed=7)
    fresh.set_epoch(1)
    assert list(fresh) == e1


def test_a_resumed_epoch_skips_only_in_that_epoch_and_only_once() -> None:
    """skip_in_epoch waits for set_epoch of its epoch: iterating before it (Lightning's set-up checks) uses nothing
    up, the epoch then yields the rest of its order, and the next iteration is whole again."""
    reference = SubsetSampler(40, seed=3, num_replicas=2, rank=1)
    reference.set_epoch(2)
    whole = list(reference)
    sampler = SubsetSampler(40, seed=3, num_replicas=2, rank=1)
    sampler.skip_in_epoch(2, 6)
    assert len(list(sampler)) == 20  # epoch 0 order, not armed yet
    sampler.set_epoch(1)
    assert len(list(sampler)) == 20
    sampler.set_epoch(2)
    assert list(sampler) == whole[6:]
    assert list(sampler) == whole  # used once


def test_seed_changes_the_order() -> None:
    a, b = SubsetSampler(200, seed=1), SubsetSampler(200, seed=2)
    assert list(a) != list(b)
    assert sorted(a) == sorted(b)


def test_left_out_samples_change_between_epochs() -> None:
    # A full epoch over M samples leaves out M mod W of them, different ones each epoch.
    sampler = SubsetSampler(10, seed=0, num_replicas=4, rank=0)
    others = [SubsetSampler(10, seed=0, num_replicas=4, rank=r) for r in range(1, 4)]
    left_out = set()
    for epoch in range(20):
        seen = set()
        for s in [sampler, *others]:
            s.set_epoch(epoch)
            seen |= set(s)
        assert len(seen) == 8
        left_out |= set(range(10)) - seen
    assert len(left_out) > 2


def test_rank_does_not_change_the_global_order() -> None:
    seeds = [SubsetSampler(50, seed=11, num_replicas=4, rank=r) for r in range(4)]
    for s in seeds:
        s.set_epoch(3)
    reference = SubsetSampler(50, seed=11, num_replicas=4, rank=0)
    reference.set_epoch(3)
    for s in seeds:
        assert torch.equal(s.epoch_order(), reference.epoch_order())
        assert torch.equal(s.shard(), reference.epoch_order()[s.rank :: 4])
    # Rank-seeded shuffles would let two ranks pick the same sample; here they never do.
    assert len({i for s in seeds for i in s}) == 48


def test_set_pool_validation_and_copy() -> None:
    sampler = SubsetSampler(20, num_replicas=3, rank=1)
    for dtype in (torch.float32, torch.int32, torch.float64):
        with pytest.raises(TypeError, match="int64"):
            sampler.set_pool(torch.arange(6, dtype=dtype))
    with pytest.raises(ValueError, match="3 ranks"):
        sampler.set_pool(torch.tensor([1, 2], dtype=torch.int64))
    pool = torch.tensor([4, 9, 17], dtype=torch.int64)
    sampler.set_pool(pool)  # exactly one sample per rank is allowed
    assert len(sampler) == 1
    pool[:] = 0  # the sampler keeps its own copy
    assert sorted(sampler.epoch_order().tolist()) == [4, 9, 17]


def test_set_pool_then_set_full() -> None:
    sampler = SubsetSampler(30, seed=5, num_replicas=2, rank=0)
    full_len = len(sampler)
    assert full_len == 15
    sampler.set_pool(torch.tensor([3, 5, 8, 13, 21, 29], dtype=torch.int64))
    assert len(sampler) == 3
    assert set(sampler) <= {3, 5, 8, 13, 21, 29}
    sampler.set_full()
    assert len(sampler) == full_len
    assert sorted(sampler.epoch_order().tolist()) == list(range(30))


def test_invalid_rank() -> None:
    with pytest.raises(ValueError, match="rank"):
        SubsetSampler(10, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="rank"):
        SubsetSampler(10, num_replicas=2, rank=-1)


def test_works_as_a_dataloader_sampler() -> None:
    data = torch.arange(100) * 10
    sampler = SubsetSampler(100, seed=0, num_replicas=2, rank=1)
    sampler.set_pool(torch.arange(0, 100, 5, dtype=torch.int64))
    loader = torch.utils.data.DataLoader(data, sampler=sampler, batch_size=4, drop_last=True)
    batches = list(loader)
    assert len(batches) == 10 // 4
    values = torch.cat(batches).tolist()
    assert all(v % 50 == 0 for v in values)  # pool indices are multiples of 5, data = 10 * index


# ---------------------------------------------------------------------------------------------------------------
# ScoreBank
# ---------------------------------------------------------------------------------------------------------------


def test_update_writes_scores_and_steps() -> None:
    bank = ScoreBank(20)
    assert len(bank) == 20
    assert bank.coverage() == 0.0
    bank.update(torch.tensor([3, 7, 19]), torch.tensor([1.5, 2.5, 3.5]), step=4)
    assert bank.scores[[3, 7, 19]].tolist() == [1.5, 2.5, 3.5]
    assert bank.measured_at[[3, 7, 19]].tolist() == [4, 4, 4]
    assert int((bank.measured_at == -1).sum()) == 17
    assert bank.coverage() == pytest.approx(3 / 20)
    bank.update(torch.tensor([7]), torch.tensor([9.0], dtype=torch.bfloat16), step=10)
    assert bank.scores[7] == 9.0
    assert bank.measured_at[7] == 10
    assert bank.scores.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int32])
def test_update_rejects_non_int64_indices(dtype: torch.dtype) -> None:
    bank = ScoreBank(20)
    with pytest.raises(TypeError, match="int64"):
        bank.update(torch.tensor([1, 2]).to(dtype), torch.tensor([0.5, 0.6]), step=0)
    assert bank.coverage() == 0.0


def test_h1_indices_stay_exact_int64() -> None:
    """H1: bf16/float32 cannot hold large indices (float32 is exact only up to 2**24), so only int64 is taken."""
    big = 2**24 + 1
    assert int(torch.tensor([big], dtype=torch.int64).float()[0]) != big  # what a float index would become
    bank = ScoreBank(20)
    idx = torch.arange(20, dtype=torch.int64).flip(0)
    scores = torch.arange(20, dtype=torch.float32) / 4
    bank.update(idx, scores, step=1)
    # Each score lands at exactly its own index (a lossy index would scatter or collide).
    assert torch.equal(bank.scores, (19 - torch.arange(20, dtype=torch.float32)) / 4)
    with pytest.raises(TypeError):
        bank.update(idx.float(), scores, step=2)
    assert torch.equal(bank.measured_at, torch.ones(20, dtype=torch.int64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_name_the_samples(bad: float) -> None:
    bank = ScoreBank(20)
    with pytest.raises(FloatingPointError, match=r"\[5, 12\]"):
        bank.update(torch.tensor([2, 5, 12]), torch.tensor([0.1, bad, bad]), step=0)
    # Nothing is written when a batch is rejected.
    assert bank.coverage() == 0.0
    assert torch.equal(bank.scores, torch.zeros(20))


def test_filled_uses_mean_of_measured() -> None:
    bank = ScoreBank(6)
    assert torch.equal(bank.filled(), torch.zeros(6))  # nothing measured: neutral zeros
    bank.update(torch.tensor([0, 2]), torch.tensor([1.0, 4.0]), step=0)
    filled = bank.filled()
    assert filled.tolist() == [1.0, 2.5, 4.0, 2.5, 2.5, 2.5]
    assert bank.scores[1] == 0.0  # filled() does not write into the bank
    bank.update(torch.arange(6), torch.arange(6.0), step=1)
    assert torch.equal(bank.filled(), torch.arange(6.0))


def test_state_dict_round_trip() -> None:
    bank = ScoreBank(10)
    bank.update(torch.tensor([1, 4, 9]), torch.tensor([0.25, -1.0, 3.0]), step=17)
    state = bank.state_dict()
    restored = ScoreBank(10)
    restored.load_state_dict(state)
    assert torch.equal(restored.scores, bank.scores)
    assert torch.equal(restored.measured_at, bank.measured_at)
    assert torch.equal(restored.filled(), bank.filled())
    # Independent copies: later updates do not leak between the bank, its state and the restored bank.
    bank.update(torch.tensor([0]), torch.tensor([5.0]), step=18)
    assert state["scores"][0] == 0.0
    assert restored.scores[0] == 0.0
    assert restored.measured_at[0] == -1


def test_load_state_dict_rejects_size_mismatch() -> None:
    with pytest.raises(ValueError, match="12"):
        ScoreBank(10).load_state_dict(ScoreBank(12).state_dict())
    bad = ScoreBank(10).state_dict()
    bad["measured_at"] = bad["measured_at"][:9]
    bank = ScoreBank(10)
    with pytest.raises(ValueError, match="10"):
        bank.load_state_dict(bad)
    assert bank.measured_at.numel() == 10
