"""Selection rules and selectors: random, hard (top-k) and soft (Gumbel-top-k, temperature before the noise).

Frequency tests use fixed generator seeds and bounds of >= 5 standard deviations, so they never flake, while the
alternatives they guard against (top-k, a temperature applied after the noise, ...) miss them by far more.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from attent_vision.selection.selectors import (
    FullData,
    HardSelector,
    RandomSelector,
    SoftSelector,
    select,
)
from attent_vision.selection.strategies import log_weights, select_hard, select_random, select_soft, top_k


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: intra-op threads only add overhead (logsigmoid costs ms per call on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inclusion(
    strategy: str, scores: torch.Tensor, k: int, draws: int, seed: int = 0, **kwargs
) -> torch.Tensor:
    """Fraction of ``draws`` selections that include each sample (one generator advanced across draws)."""
    generator = _gen(seed)
    counts = torch.zeros(scores.numel(), dtype=torch.float64)
    for _ in range(draws):
        counts[select(strategy, scores, k, generator=generator, **kwargs)] += 1
    return counts / draws


def _plackett_luce_inclusion(weights: list[float], k: int) -> list[float]:
    """Exact inclusion probabilities of sampling k items without replacement in proportion to ``weights``."""
    total = sum(weights)
    inclusion = [0.0] * len(weights)
    for order in itertools.permutations(range(len(weights)), k):
        p, left = 1.0, total
        for i in order:
            p *= weights[i] / left
            left -= weights[i]
        for i in order:
            inclusion[i] += p
    return inclusion


# ---------------------------------------------------------------------------------------------------------------
# Shape, dtype and determinism
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["random", "hard", "soft"])
@pytest.mark.parametrize("k", [1, 7, 49, 50])
def test_result_is_sorted_unique_int64_of_length_k(strategy: str, k: int) -> None:
    scores = torch.randn(50, generator=_gen(1))
    out = select(strategy, scores, k, generator=_gen(2))
    assert out.dtype == torch.int64
    assert out.shape == (k,)
    assert torch.equal(out, out.sort().values)
    assert out.unique().numel() == k
    assert int(out.min()) >= 0
    assert int(out.max()) < 50


@pytest.mark.parametrize("strategy", ["random", "soft"])
def test_deterministic_for_a_generator_seed(strategy: str) -> None:
    scores = torch.randn(200, generator=_gen(3))
    a = select(strategy, scores, 40, generator=_gen(7))
    b = select(strategy, scores, 40, generator=_gen(7))
    assert torch.equal(a, b)
    # Another seed gives another subset (C(200, 40) possibilities: a collision means the seed is ignored).
    c = select(strategy, scores, 40, generator=_gen(8))
    assert not torch.equal(a, c)
    # The generator advances: two consecutive draws differ.
    generator = _gen(7)
    first = select(strategy, scores, 40, generator=generator)
    second = select(strategy, scores, 40, generator=generator)
    assert torch.equal(first, a)
    assert not torch.equal(first, second)


def test_random_ignores_scores() -> None:
    a = select("random", torch.randn(100, generator=_gen(0)), 30, generator=_gen(5))
    b = select("random", torch.arange(100.0), 30, generator=_gen(5))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Hard and the temperature limits of soft
# ---------------------------------------------------------------------------------------------------------------


def test_hard_is_exact_top_k() -> None:
    scores = torch.randn(300, generator=_gen(11))
    for k in (1, 5, 150, 300):
        out = select("hard", scores, k, generator=_gen(0))
        expected = torch.argsort(scores, descending=True)[:k].sort().values
        assert torch.equal(out, expected)
        # Every selected score is >= every unselected one.
        mask = torch.zeros(300, dtype=torch.bool)
        mask[out] = True
        if k < 300:
            assert scores[mask].min() > scores[~mask].max()


def test_hard_ignores_generator_and_half_precision_scores() -> None:
    scores = torch.linspace(-2, 2, 64).to(torch.bfloat16)[torch.randperm(64, generator=_gen(0))]
    out = select_hard(scores, 10)
    assert set(out.tolist()) == set(torch.argsort(scores.float(), descending=True)[:10].tolist())


def test_soft_with_tiny_temperature_equals_hard() -> None:
    # Distinct scores 0.1 apart: log-weight gaps / 1e-4 = 1000, far above any Gumbel noise range (< 45).
    scores = (torch.arange(40, dtype=torch.float32) * 0.1)[torch.randperm(40, generator=_gen(4))]
    for seed in range(20):
        for k in (1, 9, 25):
            soft = select("soft", scores, k, generator=_gen(seed), temperature=1e-4)
            assert torch.equal(soft, select("hard", scores, k, generator=_gen(seed)))


def test_soft_with_huge_temperature_is_uniform() -> None:
    n, k, draws = 10, 3, 3000
    scores = torch.linspace(0, 5, n)  # softmax weights span e^5 ~ 150x
    freq = _inclusion("soft", scores, k, draws, seed=21, temperature=1e6)
    # Each inclusion frequency ~ k / n = 0.3 with sd sqrt(0.3 * 0.7 / 3000) = 0.0084; top-k would be 0 or 1.
    assert (freq - k / n).abs().max() < 0.05
    # Chi-square over the counts (9 dof): mean 9, 99.99th percentile ~ 33.7.
    counts = freq * draws
    expected = draws * k / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 40


def test_random_inclusion_is_uniform_and_hard_is_not() -> None:
    n, k, draws = 10, 3, 3000
    scores = torch.linspace(0, 5, n)
    rand = _inclusion("random", scores, k, draws, seed=22)
    assert (rand - k / n).abs().max() < 0.05
    hard = _inclusion("hard", scores, k, 20, seed=22)
    assert (hard - k / n).abs().max() > 0.5  # the same bound catches top-k


# ---------------------------------------------------------------------------------------------------------------
# Soft selection probabilities
# ---------------------------------------------------------------------------------------------------------------


def test_soft_k1_follows_softmax_weights() -> None:
    # Gumbel-max: argmax(log p + g) ~ Categorical(p).
    scores = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    freq = _inclusion("soft", scores, 1, 4000, seed=31)
    expected = torch.softmax(scores.double(), 0)
    assert freq.sum() == pytest.approx(1.0)
    # sd <= sqrt(0.25 / 4000) = 0.0079
    assert (freq - expected).abs().max() < 0.04


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_soft_k1_follows_tempered_weights(temperature: float) -> None:
    # With the temperature inside the noise, the weights are w^(1/tau) = softmax(s / tau).
    scores = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    freq = _inclusion("soft", scores, 1, 4000, seed=32, temperature=temperature)
    expected = torch.softmax(scores.double() / temperature, 0)
    assert (freq - expected).abs().max() < 0.04


def test_soft_k_gt_1_is_plackett_luce_and_monotone_in_score() -> None:
    n, k, draws = 8, 3, 4000
    scores = torch.linspace(0, 2, n)[torch.randperm(n, generator=_gen(5))]
    freq = _inclusion("soft", scores, k, draws, seed=33)
    assert freq.sum() == pytest.approx(k)
    expected = torch.tensor(_plackett_luce_inclusion(torch.exp(scores.double()).tolist(), k))
    assert (freq - expected).abs().max() < 0.04  # sd <= 0.0079
    # Ordered by score, inclusion rises (up to sampling noise) and clearly overall.
    by_score = freq[torch.argsort(scores)]
    assert all(b >= a - 0.02 for a, b in itertools.pairwise(by_score.tolist()))
    assert by_score[-1] - by_score[0] > 0.3


def test_temperature_changes_the_selection() -> None:
    """The original code divided the keys by tau *after* adding the noise, which leaves the top-k unchanged."""
    n, k, draws = 10, 2, 2000
    scores = torch.linspace(0, 3, n)
    sharp = _inclusion("soft", scores, k, draws, seed=41, temperature=0.25)
    flat = _inclusion("soft", scores, k, draws, seed=41, temperature=4.0)
    # Same generator seed: a post-noise temperature would give identical frequencies.
    top = n - 1
    assert sharp[top] > 0.97  # weights e^(4 s): the top sample nearly always wins
    assert flat[top] < 0.5  # weights e^(s / 4): close to uniform (k / n = 0.2)
    assert sharp[top] - flat[top] > 0.4
    assert flat[0] > 0.05 > sharp[0]


def test_temperature_changes_individual_draws_with_the_same_generator_seed() -> None:
    scores = torch.linspace(0, 3, 50)
    differs = [
        not torch.equal(
            select_soft(scores, 10, generator=_gen(seed), temperature=0.25),
            select_soft(scores, 10, generator=_gen(seed), temperature=4.0),
        )
        for seed in range(10)
    ]
    assert all(differs)


def test_soft_sigmoid_normalisation() -> None:
    scores = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
    assert torch.allclose(log_weights(scores, "sigmoid"), torch.log(torch.sigmoid(scores.double())))
    assert torch.allclose(log_weights(scores, "softmax"), torch.log_softmax(scores.double(), 0))
    freq = _inclusion("soft", scores, 1, 4000, seed=51, normalization="sigmoid")
    sig = torch.sigmoid(scores.double())
    assert (freq - sig / sig.sum()).abs().max() < 0.04
    # Differs from softmax, where the top score (weight e^4) dominates: 0.87 vs 0.32.
    softmax_freq = _inclusion("soft", scores, 1, 4000, seed=51, normalization="softmax")
    assert softmax_freq[-1] - freq[-1] > 0.4


def test_soft_sigmoid_is_nearly_uniform_for_positive_losses() -> None:
    # Sigmoid normalisation: log sigmoid(loss) lies in (-0.69, 0) for positive losses, so weights differ by < 2x.
    n, k = 10, 3
    scores = torch.linspace(0.5, 5, n)
    freq = _inclusion("soft", scores, k, 3000, seed=52, normalization="sigmoid")
    assert freq.max() - freq.min() < 0.25
    assert freq[-1] > freq[0]


# ---------------------------------------------------------------------------------------------------------------
# Invalid arguments
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_invalid_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match=r"selection\.temperature"):
        select("soft", torch.randn(10), 3, generator=_gen(0), temperature=temperature)
    with pytest.raises(ValueError, match=r"selection\.temperature"):
        select_soft(torch.randn(10), 3, generator=_gen(0), temperature=temperature)


def test_invalid_strategy_and_normalisation() -> None:
    with pytest.raises(ValueError, match=r"selection\.strategy"):
        select("greedy", torch.randn(10), 3, generator=_gen(0))
    with pytest.raises(ValueError, match=r"selection\.normalization"):
        select("soft", torch.randn(10), 3, generator=_gen(0), normalization="tanh")


@pytest.mark.parametrize("strategy", ["random", "hard", "soft"])
@pytest.mark.parametrize("k", [0, -1, 11])
def test_invalid_k(strategy: str, k: int) -> None:
    with pytest.raises(ValueError, match="k="):
        select(strategy, torch.randn(10), k, generator=_gen(0))


def test_select_random_direct_call_matches_dispatch() -> None:
    scores = torch.randn(30)
    direct = select_random(scores, 12, generator=_gen(9)).sort().values
    assert torch.equal(direct, select("random", scores, 12, generator=_gen(9)))


# ---------------------------------------------------------------------------------------------------------------
# Selectors (what the selection group builds)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls", "needs_scores"),
    [
        ("none", FullData, False),
        ("random", RandomSelector, False),
        ("hard", HardSelector, True),
        ("soft", SoftSelector, True),
    ],
)
def test_each_selection_option_builds_its_selector_with_only_its_keys(compose_cfg, name, cls, needs_scores):
    import hydra

    cfg = compose_cfg(f"selection={name}")
    selector = hydra.utils.instantiate(cfg.selection)
    assert type(selector) is cls and selector.strategy == name and selector.needs_scores is needs_scores
    keys = set(cfg.selection) - {"_target_"}
    assert keys == set(selector.summary())  # every key is a constructor argument, none is dead
    if name != "soft":
        assert "temperature" not in keys and "normalization" not in keys


def test_soft_selector_defaults_and_validation() -> None:
    soft = SoftSelector()
    assert (soft.reselect, soft.temperature, soft.normalization) == ("every", 1.0, "softmax")
    assert HardSelector().reselect == "cycle"
    with pytest.raises(ValueError, match=r"selection\.reselect"):
        HardSelector(reselect="always")
    with pytest.raises(ValueError, match=r"selection\.total_cycles"):
        RandomSelector(total_cycles=0)


def test_top_k_is_topk_as_sorted_indices_with_ties_to_the_lowest_index() -> None:
    keys = torch.randn(10_001, generator=_gen(3), dtype=torch.float64)
    for k in (0, 1, 17, 5_000, 10_000, 10_001):
        expected = torch.topk(keys, k, sorted=False).indices.sort().values
        assert torch.equal(top_k(keys, k), expected)
    tied = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.0, 2.0])  # k=3: the 3, then two of the four 2s
    assert top_k(tied, 3).tolist() == [0, 2, 3]
    assert top_k(torch.zeros(6), 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"k=8 is outside \[0, 7\]"):
        top_k(tied, 8)
