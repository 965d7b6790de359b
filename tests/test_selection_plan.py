"""Schedules and the epoch plan of the AtteNT teacher.

The original formulas; no epoch dropped, the same k in every subset epoch of a cycle.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest

from attent_vision.selection.plan import (
    PlanRequest,
    build_plan,
    first_reselection_of_cycle,
    full_data_plan,
    plan_totals,
    resolve_estimate,
    steps_for,
    subset_size,
)
from attent_vision.selection.schedules import IntervalSchedule, RatioSchedule

# The original AtteNT ratio formulas, defaults 0.2 -> 0.8 over T = 10 cycles.
COSINE_REF = [0.200, 0.218, 0.270, 0.350, 0.448, 0.552, 0.650, 0.730, 0.782, 0.800]
INCREMENTAL_REF = [0.200, 0.267, 0.333, 0.400, 0.467, 0.533, 0.600, 0.667, 0.733, 0.800]


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "expected"), [("cosine", COSINE_REF), ("incremental", INCREMENTAL_REF)])
def test_ratio_schedule_matches_reference_values(kind: str, expected: list[float]) -> None:
    schedule = RatioSchedule(kind, 0.2, 0.8)
    values = [schedule(c, 10) for c in range(10)]
    assert [round(v, 3) for v in values] == expected
    assert values[0] == pytest.approx(0.2, abs=1e-12)
    assert values[-1] == pytest.approx(0.8, abs=1e-12)
    assert all(b > a for a, b in itertools.pairwise(values))


def test_ratio_schedule_defaults_are_incremental_02_to_08() -> None:
    schedule = RatioSchedule()
    assert [round(schedule(c, 10), 3) for c in range(10)] == INCREMENTAL_REF


def test_ratio_constant_ignores_cycle_and_final() -> None:
    schedule = RatioSchedule("constant", 0.3, 0.9)
    assert {schedule(c, 7) for c in range(7)} == {0.3}
    # final may be below initial for a constant schedule: it is unused.
    assert RatioSchedule("constant", 0.5, 0.1)(3, 4) == 0.5


@pytest.mark.parametrize("kind", ["cosine", "incremental"])
def test_ratio_single_cycle_counts_as_finished(kind: str) -> None:
    # T = 1: progress p = 1 (reference), so the only cycle uses the final ratio.
    assert RatioSchedule(kind, 0.2, 0.8)(0, 1) == pytest.approx(0.8)


@pytest.mark.parametrize("kind", ["cosine", "incremental"])
def test_ratio_stays_inside_initial_final(kind: str) -> None:
    schedule = RatioSchedule(kind, 0.1, 0.95)
    for total in (2, 3, 7, 50):
        values = [schedule(c, total) for c in range(total)]
        assert min(values) >= 0.1
        assert max(values) <= 0.95
        assert values[0] == pytest.approx(0.1)
        assert values[-1] == pytest.approx(0.95)


def test_interval_incremental_5_to_10_matches_reference() -> None:
    schedule = IntervalSchedule("incremental", 5, 10)
    assert [schedule(c, 10) for c in range(10)] == [5, 5, 6, 6, 7, 7, 8, 8, 9, 10]


def test_interval_incremental_readme_5_to_50() -> None:
    schedule = IntervalSchedule("incremental", 5, 50)
    assert [schedule(c, 10) for c in range(10)] == list(range(5, 51, 5))


def test_interval_incremental_is_exact_integer_floor() -> None:
    # floor((max - initial) * c / (T - 1)) must be exact: a float product (55 * (3 / 11) = 14.999...) would
    # lose one epoch.
    for total in range(2, 25):
        for initial in (1, 2, 5):
            for maximum in range(initial, initial + 70):
                schedule = IntervalSchedule("incremental", initial, maximum)
                got = [schedule(c, total) for c in range(total)]
                want = [initial + (maximum - initial) * c // (total - 1) for c in range(total)]
                assert got == want, (initial, maximum, total)


def test_interval_fixed_and_single_cycle() -> None:
    assert {IntervalSchedule("fixed", 3, 99)(c, 10) for c in range(10)} == {3}
    # T = 1: p = 1, so an incremental schedule's only cycle uses max.
    assert IntervalSchedule("incremental", 2, 6)(0, 1) == 6
    assert IntervalSchedule("fixed", 2, 6)(0, 1) == 2


@pytest.mark.parametrize(
    ("factory", "key"),
    [
        (lambda: RatioSchedule("cosine", 0.0, 0.8), "ratio.initial"),
        (lambda: RatioSchedule("cosine", -0.1, 0.8), "ratio.initial"),
        (lambda: RatioSchedule("cosine", 1.2, 1.0), "ratio.initial"),
        (lambda: RatioSchedule("cosine", 0.2, 1.5), "ratio.final"),
        (lambda: RatioSchedule("incremental", 0.2, 0.0), "ratio.final"),
        (lambda: RatioSchedule("incremental", 0.6, 0.4), "ratio.final"),
        (lambda: RatioSchedule("linear", 0.2, 0.8), "ratio.kind"),
        (lambda: IntervalSchedule("incremental", 0, 5), "interval.initial"),
        (lambda: IntervalSchedule("fixed", -2, 5), "interval.initial"),
        (lambda: IntervalSchedule("incremental", 6, 5), "interval.max"),
        (lambda: IntervalSchedule("cosine", 5, 10), "interval.kind"),
    ],
)
def test_schedule_validation_names_the_key(factory, key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(key)):
        factory()


def test_ratio_of_one_is_valid() -> None:
    assert RatioSchedule("incremental", 1.0, 1.0)(4, 5) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------------------


def _expected_k(ratio: float, m: int, world: int) -> int:
    k = max(1, min(math.floor(m * ratio), m))
    return max(world, k - k % world)


def _cycles(plan) -> dict[int, list]:
    out: dict[int, list] = {}
    for p in plan:
        if p.cycle is not None:
            out.setdefault(p.cycle, []).append(p)
    return out


PLAN_CASES = [
    # (max_epochs, total_cycles, interval schedule, dataset_size, batch, world)
    (
        100,
        10,
        IntervalSchedule("fixed", 5),
        1000,
        8,
        1,
    ),  # 99 = 9 * 10 + 9: the remainder goes to the last cycles, not dropped
    (800, 10, IntervalSchedule("fixed", 5), 1000, 8, 2),
    (800, 10, IntervalSchedule("incremental", 5, 50), 997, 4, 3),
    (95, 10, IntervalSchedule("incremental", 5, 10), 640, 16, 4),
    (11, 10, IntervalSchedule("fixed", 1), 50, 2, 1),
    (12, 1, IntervalSchedule("incremental", 2, 6), 123, 5, 2),
    (37, 4, IntervalSchedule("incremental", 1, 8), 300, 7, 3),
    (25, 3, IntervalSchedule("fixed", 2), 64, 8, 1),
    (101, 7, IntervalSchedule("incremental", 3, 9), 10_000, 32, 4),
]


@pytest.mark.parametrize("reselect", ["every", "cycle"])
@pytest.mark.parametrize(("max_epochs", "total", "interval", "m", "batch", "world"), PLAN_CASES)
def test_plan_structure(
    reselect: str, max_epochs: int, total: int, interval: IntervalSchedule, m: int, batch: int, world: int
) -> None:
    ratio = RatioSchedule("cosine", 0.2, 0.8)
    plan = build_plan(
        max_epochs=max_epochs,
        dataset_size=m,
        batch_size=batch,
        world_size=world,
        reselect=reselect,
        ratio=ratio,
        interval=interval,
        total_cycles=total,
    )
    # No epoch dropped (the original loop lost the remainder), epochs numbered in order.
    assert len(plan) == max_epochs
    assert [p.epoch for p in plan] == list(range(max_epochs))

    full_samples = m - m % world
    full_steps = (full_samples // world) // batch

    first = plan[0]
    assert (first.kind, first.cycle, first.ratio, first.reselect) == ("full", None, 1.0, False)
    assert (first.num_samples, first.num_steps) == (full_samples, full_steps)

    # Cycles are contiguous, in order, and cover every later epoch.
    assert [p.cycle for p in plan[1:]] == sorted(p.cycle for p in plan[1:])
    cycles = _cycles(plan)
    assert sorted(cycles) == list(range(total))
    lengths = [len(cycles[c]) for c in range(total)]
    assert sum(lengths) == max_epochs - 1
    assert max(lengths) - min(lengths) <= 1  # epochs shared out evenly

    every = reselect == "every"
    for c, epochs in cycles.items():
        n_subset = interval(c, total)
        assert [p.kind for p in epochs] == ["subset"] * n_subset + ["full"] * (len(epochs) - n_subset)
        r = ratio(c, total)
        k = _expected_k(r, m, world)
        assert k % world == 0
        for i, p in enumerate(epochs):
            if p.kind == "subset":
                assert p.ratio == pytest.approx(r)
                # Same k in every subset epoch of the cycle (the original shrank it at each re-selection).
                assert p.num_samples == k
                assert p.num_steps == (k // world) // batch
                assert p.num_steps >= 1
                assert p.reselect == (i == 0 or every)
            else:
                assert p.ratio == 1.0
                assert p.reselect is False
                assert (p.num_samples, p.num_steps) == (full_samples, full_steps)


def test_plan_remainder_is_kept_in_later_cycles() -> None:
    plan = build_plan(
        max_epochs=100,
        dataset_size=1000,
        batch_size=10,
        interval=IntervalSchedule("fixed", 5),
        total_cycles=10,
    )
    lengths = [len(v) for _, v in sorted(_cycles(plan).items())]
    assert lengths == [9] + [10] * 9
    assert sum(p.kind == "subset" for p in plan) == 50
    assert sum(p.kind == "full" for p in plan) == 50


def test_plan_reselect_override() -> None:
    kwargs = dict(
        max_epochs=31, dataset_size=200, batch_size=4, total_cycles=3, interval=IntervalSchedule("fixed", 4)
    )
    soft_once = build_plan(reselect="cycle", **kwargs)
    hard_every = build_plan(reselect="every", **kwargs)
    assert sum(p.reselect for p in soft_once) == 3
    assert sum(p.reselect for p in hard_every) == 12
    assert all(p.reselect == (p.kind == "subset") for p in hard_every)


def test_subset_size_rounding() -> None:
    assert subset_size(0.2, 1000) == 200
    assert subset_size(0.0001, 1000) == 1  # never empty
    assert subset_size(1.0, 1000) == 1000
    assert subset_size(0.333, 1000, world_size=4) == 332  # floor(333) rounded down to a multiple of 4
    assert subset_size(0.001, 1000, world_size=4) == 4  # at least one sample per rank
    assert subset_size(1.0, 1001, world_size=4) == 1000
    assert steps_for(332, world_size=4, batch_size=10) == 8
    assert steps_for(1000, world_size=3, batch_size=7) == 47


def test_full_data_plan_is_all_full() -> None:
    plan = full_data_plan(PlanRequest(max_epochs=17, dataset_size=101, batch_size=5, world_size=2))
    assert len(plan) == 17
    assert all(p.kind == "full" and p.cycle is None and not p.reselect and p.ratio == 1.0 for p in plan)
    assert {p.num_samples for p in plan} == {100}
    assert {p.num_steps for p in plan} == {10}


@pytest.mark.parametrize(
    ("total", "interval"),
    [
        (10, IntervalSchedule("incremental", 5, 10)),
        (10, IntervalSchedule("incremental", 5, 50)),
        (10, IntervalSchedule("fixed", 5)),
        (4, IntervalSchedule("incremental", 1, 8)),
        (3, IntervalSchedule("incremental", 2, 3)),
        (1, IntervalSchedule("incremental", 2, 6)),
        (7, IntervalSchedule("incremental", 3, 20)),
    ],
)
def test_plan_too_few_epochs_suggests_a_working_minimum(total: int, interval: IntervalSchedule) -> None:
    kwargs = dict(dataset_size=500, batch_size=4, reselect="every", interval=interval, total_cycles=total)
    with pytest.raises(ValueError, match=r"trainer\.max_epochs") as info:
        build_plan(max_epochs=3, **kwargs)
    match = re.search(r"trainer\.max_epochs>=(\d+)", str(info.value))
    assert match, str(info.value)
    minimum = int(match.group(1))
    plan = build_plan(max_epochs=minimum, **kwargs)
    assert len(plan) == minimum
    # Every cycle holds its interval of subset epochs.
    for c, epochs in _cycles(plan).items():
        assert sum(p.kind == "subset" for p in epochs) == interval(c, total)
    with pytest.raises(ValueError, match=r"trainer\.max_epochs"):
        build_plan(max_epochs=minimum - 1, **kwargs)


def test_plan_minimum_for_defaults() -> None:
    # Default intervals 5,5,6,6,7,7,8,8,9,10: with an even split the last cycle needs 10 epochs, so cycle lengths
    # are at least [9] * 9 + [10] = 91, plus the initial full epoch.
    kwargs = dict(dataset_size=500, batch_size=4)
    with pytest.raises(ValueError, match=r"trainer\.max_epochs>=92"):
        build_plan(max_epochs=80, **kwargs)
    assert len(build_plan(max_epochs=92, **kwargs)) == 92
    with pytest.raises(ValueError, match=r"trainer\.max_epochs"):
        build_plan(max_epochs=91, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(reselect="sometimes"), "selection.reselect"),
        (dict(total_cycles=0), "selection.total_cycles"),
        (dict(max_epochs=0), "trainer.max_epochs"),
        (dict(ratio=RatioSchedule("constant", 0.01, 0.01)), "ratio.initial"),  # 1 sample < one batch
    ],
)
def test_plan_invalid_arguments_name_the_key(kwargs: dict, key: str) -> None:
    args = dict(max_epochs=50, dataset_size=200, batch_size=4, reselect="every", total_cycles=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(key)):
        build_plan(**args)


def test_plan_dataset_smaller_than_one_global_batch() -> None:
    with pytest.raises(ValueError, match="batch"):
        full_data_plan(PlanRequest(max_epochs=5, dataset_size=7, batch_size=4, world_size=2))


def test_plan_totals() -> None:
    plan = build_plan(
        max_epochs=100,
        dataset_size=1000,
        batch_size=10,
        world_size=2,
        reselect="every",
        ratio=RatioSchedule("incremental", 0.2, 0.8),
        interval=IntervalSchedule("incremental", 5, 10),
        total_cycles=10,
    )
    totals = plan_totals(plan)
    assert totals["epochs"] == 100
    assert totals["subset_epochs"] == 71
    assert totals["reselections"] == 71  # soft: every subset epoch
    assert totals["optimizer_steps"] == sum(p.num_steps for p in plan)
    assert totals["samples"] == sum(p.num_samples for p in plan)
    assert totals["sample_fraction"] == pytest.approx(totals["samples"] / (1000 * 100))
    assert 0 < totals["sample_fraction"] < 1
    full_steps = (1000 // 2) // 10
    assert totals["step_fraction"] == pytest.approx(totals["optimizer_steps"] / (full_steps * 100))

    hard = plan_totals(build_plan(max_epochs=100, dataset_size=1000, batch_size=10, reselect="cycle"))
    assert hard["reselections"] == 10

    none = plan_totals(full_data_plan(PlanRequest(max_epochs=9, dataset_size=1000, batch_size=10)))
    assert none == {
        "epochs": 9,
        "subset_epochs": 0,
        "reselections": 0,
        "optimizer_steps": 900,
        "samples": 9000,
        "sample_fraction": 1.0,
        "step_fraction": 1.0,
    }


def test_plan_is_a_pure_function() -> None:
    kwargs = dict(max_epochs=95, dataset_size=640, batch_size=16, world_size=4, reselect="every")
    assert [p.as_dict() for p in build_plan(**kwargs)] == [p.as_dict() for p in build_plan(**kwargs)]


def test_printed_entries_keep_seven_keys_unless_estimated() -> None:
    plan = build_plan(max_epochs=92, dataset_size=500, batch_size=4)
    assert all(
        set(p.as_dict()) == {"epoch", "kind", "cycle", "ratio", "num_samples", "num_steps", "reselect"}
        for p in plan
    )
    request = PlanRequest(max_epochs=4, dataset_size=100, batch_size=4, world_size=2)
    estimated = request.subset_epoch(1, None, 60, reselect=True, estimated=True)
    assert estimated.as_dict()["estimated"] is True
    assert (estimated.ratio, estimated.num_steps) == (0.6, 7)


def test_first_reselection_of_cycle() -> None:
    plan = build_plan(
        max_epochs=13,
        dataset_size=100,
        batch_size=4,
        total_cycles=2,
        reselect="every",
        interval=IntervalSchedule("fixed", 3),
    )
    firsts = [p.epoch for p in plan if p.reselect and first_reselection_of_cycle(plan, p.epoch)]
    assert firsts == [1, 7]
    assert [p.epoch for p in plan if p.reselect] == [1, 2, 3, 7, 8, 9]


def test_resolve_estimate_fixes_its_epoch_and_re_estimates_the_later_ones() -> None:
    request = PlanRequest(max_epochs=6, dataset_size=100, batch_size=4, world_size=2)
    plan = [
        request.full_epoch(0),
        *(request.subset_epoch(e, None, 70, reselect=True, estimated=True) for e in (1, 2, 3)),
        request.full_epoch(4),
        request.full_epoch(5),
    ]
    resolved = resolve_estimate(plan, 1, 58, request)
    assert [p.num_samples for p in resolved] == [100, 58, 58, 58, 100, 100]
    assert [p.estimated for p in resolved] == [False, False, True, True, False, False]
    assert resolved[1].num_steps == 7 and resolved[1].ratio == pytest.approx(0.58)
    assert plan[1].num_samples == 70  # a new plan; the old one is untouched
    again = resolve_estimate(resolved, 2, 64, request)
    assert [p.num_samples for p in again] == [100, 58, 64, 64, 100, 100]
    with pytest.raises(ValueError, match="no full batch"):
        resolve_estimate(plan, 1, 6, request)
