"""InfoBatch in the teacher's harness: pruning counts, unbiased rescaling, annealing, plan/LR exactness, DDP, resume."""

from __future__ import annotations

import csv
import json
from itertools import pairwise
from pathlib import Path

import hydra
import pytest
import torch

from attent_vision.lightning.optim import StepRemap
from attent_vision.lightning.pretrain import weighted_task_loss
from attent_vision.models.losses import SampleLoss, reduce_batch
from attent_vision.runs.callbacks import SpawnedProcessGroupCleanup
from attent_vision.selection import AtteNTTeacher, InfoBatchPruner, OnlineScorer, PlanRequest
from attent_vision.selection.infobatch import anneal_start, infobatch_plan, prune, pruned_count
from tests.conftest import assert_resumed_history_matches, ddp_strategy, read_summary, run_train
from tests.toy_selection import ShardRecorder, ToyDataModule, ToyRegressor, isolate_master_port, toy_trainer


def skewed_losses(num: int, seed: int = 0) -> torch.Tensor:
    """Exponential draws: right-skewed like training losses (mean above the median)."""
    return -torch.log(torch.rand(num, generator=torch.Generator().manual_seed(seed)))


# ---------------------------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_kept_fraction_weights_and_even_shards(world, ratio):
    scores = skewed_losses(10_001)
    below = scores < scores.double().mean()
    num_below = int(below.sum())
    selection = prune(scores, prune_ratio=ratio, world_size=world, generator=torch.Generator().manual_seed(1))
    kept = torch.zeros(scores.numel(), dtype=torch.bool)
    kept[selection.indices] = True
    pruned = scores.numel() - int(kept.sum())
    assert kept[~below].all()  # above-mean samples are never pruned
    assert pruned == pruned_count(
        below_mean=num_below, dataset_size=10_001, prune_ratio=ratio, world_size=world
    )
    assert abs(pruned - ratio * num_below) <= world  # round(r * B), moved by less than the world size
    assert int(kept.sum()) % world == 0
    # the kept share of the below-mean samples is 1 - r (up to that rounding), and they weigh its inverse
    keep_share = int((kept & below).sum()) / num_below
    assert keep_share == pytest.approx(1 - ratio, abs=world / num_below)
    weights = selection.weights
    assert torch.allclose(weights[kept & below], torch.tensor(1 / keep_share))
    assert torch.all(weights[~below] == 1.0)
    assert (
        torch.equal(selection.indices, selection.indices.sort().values)
        and selection.indices.dtype == torch.int64
    )


def test_pruning_is_a_function_of_the_generator_seed():
    scores = skewed_losses(500)
    a = prune(scores, prune_ratio=0.5, world_size=1, generator=torch.Generator().manual_seed(3))
    b = prune(scores, prune_ratio=0.5, world_size=1, generator=torch.Generator().manual_seed(3))
    c = prune(scores, prune_ratio=0.5, world_size=1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.indices, c.indices)


def test_weighted_task_loss_scales_samples_without_renormalising():
    loss = SampleLoss(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([4, 0, 2, 1]))
    assert weighted_task_loss(loss, None) == reduce_batch(loss)
    weights = torch.tensor([2.0, 7.0, 1.0, 1.0])
    # sample 1 has no masked pixel: out of numerator and denominator, whatever its weight
    assert weighted_task_loss(loss, weights).item() == pytest.approx((2 * 1 + 3 + 5) / 3)


def test_rescaled_loss_is_unbiased_over_random_prunings():
    """E over prunings of the epoch's summed weighted loss (as MultiMAE reduces it per batch) = the full loss."""
    losses = skewed_losses(48, seed=5)
    counts = torch.ones(48, dtype=torch.long)
    full = float(losses.sum())
    draws, batch = 3000, 8
    weighted, unweighted = [], []
    for seed in range(draws):
        generator = torch.Generator().manual_seed(seed)
        selection = prune(losses, prune_ratio=0.5, world_size=1, generator=generator)
        order = selection.indices[torch.randperm(selection.indices.numel(), generator=generator)]
        total = plain = 0.0
        for chunk in order.split(batch):  # the epoch's batches; each reduced like training_step does
            sample = SampleLoss(losses[chunk], counts[chunk])
            total += chunk.numel() * float(weighted_task_loss(sample, selection.weights[chunk]))
            plain += chunk.numel() * float(weighted_task_loss(sample, None))
        weighted.append(total)
        unweighted.append(plain)
    mean = torch.tensor(weighted, dtype=torch.float64).mean().item()
    spread = torch.tensor(weighted, dtype=torch.float64).std().item() / draws**0.5
    assert mean == pytest.approx(full, abs=5 * spread)
    assert abs(torch.tensor(unweighted).mean().item() - full) > 50 * spread  # without the weights: biased


# ---------------------------------------------------------------------------------------------------------------
# Plan, annealing and LR
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epochs", "delta", "pruned", "annealed"), [(100, 0.875, 87, 12), (8, 0.875, 6, 1), (10, 0.9, 8, 1)]
)
def test_plan_prunes_until_delta_then_anneals_on_full_data(epochs, delta, pruned, annealed):
    request = PlanRequest(max_epochs=epochs, dataset_size=256, batch_size=8, world_size=2)
    plan = infobatch_plan(request, prune_ratio=0.5, delta=delta)
    assert len(plan) == epochs and anneal_start(epochs, delta) == epochs - annealed
    assert plan[0].kind == "full" and not plan[0].estimated  # no scores yet: a full, scoring epoch
    middle, tail = plan[1 : 1 + pruned], plan[1 + pruned :]
    assert all(p.kind == "subset" and p.reselect and p.estimated and p.cycle is None for p in middle)
    assert len(tail) == annealed and all(p.kind == "full" and not p.reselect for p in tail)
    assert middle[0].num_samples == 256 - 64  # before any score: half of the samples assumed below the mean


def test_delta_that_prunes_nothing_names_the_key():
    with pytest.raises(ValueError, match=r"selection\.delta: 0\.1 x trainer\.max_epochs=10"):
        infobatch_plan(PlanRequest(10, 64, 4), prune_ratio=0.5, delta=0.1)
    with pytest.raises(ValueError, match=r"selection\.prune_ratio"):
        InfoBatchPruner(prune_ratio=1.0)


def test_step_remap_keeps_every_step_distinct_and_ends_on_the_last_position():
    remap = StepRemap(100)
    assert [remap.position(s) for s in (0, 37, 99)] == [0.0, 37.0, 99.0]  # fixed plans: the identity
    remap.resize(80, at_step=20)  # epochs turned out shorter
    assert remap.position(20) == 20.0 and remap.position(79) == pytest.approx(99.0)
    before = remap.position(50)
    remap.resize(90, at_step=50)  # and longer again
    assert remap.position(50) == pytest.approx(before) and remap.position(89) == pytest.approx(99.0)
    positions = [remap.position(s) for s in range(90)]
    assert all(b > a for a, b in pairwise(positions))


def infobatch_teacher(tmp_path: Path, **kwargs) -> AtteNTTeacher:
    return AtteNTTeacher(
        selector=InfoBatchPruner(),
        scorer=OnlineScorer(),
        seed=2,
        output_dir=str(tmp_path),
        plot=False,
        **kwargs,
    )


def fit_toy(
    tmp_path: Path, teacher: AtteNTTeacher, *, num_samples: int, extra_callbacks=(), **trainer_kwargs
) -> None:
    trainer = toy_trainer(
        tmp_path,
        [teacher, ShardRecorder(str(tmp_path / "shards")), *extra_callbacks],
        max_epochs=8,
        **trainer_kwargs,
    )
    trainer.fit(ToyRegressor(), datamodule=ToyDataModule(num_samples=num_samples, batch_size=4))


def test_pruned_epochs_are_weighted_and_resolved_then_the_last_ones_anneal(tmp_path):
    teacher = infobatch_teacher(tmp_path)
    fit_toy(tmp_path, teacher, num_samples=64)
    records = json.loads((tmp_path / "shards" / "rank0.json").read_text())
    assert not any(p.estimated for p in teacher.plan)  # every pruned epoch was resolved when selected
    for record, entry in zip(records, teacher.plan, strict=True):
        assert record["steps"] == entry.num_steps and len(record["pool"]) == entry.num_samples
    for record in records[1:7]:  # pruned: fewer samples, the kept below-mean ones weighted by ~2
        assert 32 <= len(record["pool"]) < 64
        assert {round(w, 5) for w in record["weights"]} == {1.0, round(max(record["weights"]), 5)}
        assert 1.8 < max(record["weights"]) < 2.2
    for record in (records[0], records[7]):  # the scoring epoch and the annealing epoch: full and unweighted
        assert len(record["pool"]) == 64 and record["weights"] is None
    assert [e["epoch"] for e in teacher.history] == [1, 2, 3, 4, 5, 6]
    assert [e["k"] for e in teacher.history] == [len(r["pool"]) for r in records[1:7]]
    fields = teacher.summary_fields()
    assert fields["selection"]["strategy"] == "infobatch" and fields["selection"]["scoring"] == "online"
    assert fields["planned_optimizer_steps"] == sum(r["steps"] for r in records)


def test_selection_infobatch_picks_online_scoring(compose_cfg):
    cfg = compose_cfg("selection=infobatch")
    teacher = hydra.utils.instantiate(cfg.teacher)
    assert isinstance(teacher.selector, InfoBatchPruner) and isinstance(teacher.scorer, OnlineScorer)
    assert (teacher.selector.prune_ratio, teacher.selector.delta) == (0.5, 0.875)
    assert compose_cfg("selection=infobatch", "scoring=full").scoring.mode == "full"  # the command line wins


@pytest.mark.slow
def test_two_process_ddp_ranks_prune_alike_and_split_the_kept_samples(tmp_path, monkeypatch):
    """gloo DDP with 2 forked CPU processes: same pruning and weights on both ranks, disjoint equal shards."""
    isolate_master_port(monkeypatch)
    fit_toy(
        tmp_path,
        infobatch_teacher(tmp_path),
        num_samples=66,
        devices=2,
        strategy=ddp_strategy(),
        # destroys each worker's group before the forked worker exits; the pytest process never has one
        extra_callbacks=[SpawnedProcessGroupCleanup()],
    )
    assert not torch.distributed.is_initialized()
    ranks = [json.loads((tmp_path / "shards" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 8
    for r0, r1 in zip(*ranks, strict=True):
        assert r0["pool"] == r1["pool"] and r0["weights"] == r1["weights"], f"epoch {r0['epoch']}"
        assert r0["steps"] == r1["steps"] == (len(r0["pool"]) // 2) // 4
        assert not set(r0["shard"]) & set(r1["shard"])
    pruned = [len(r["pool"]) for r in ranks[0][1:7]]
    assert all(size < 66 and size % 2 == 0 for size in pruned)
    assert ranks[0][7]["weights"] is None and len(ranks[0][7]["pool"]) == 66


# ---------------------------------------------------------------------------------------------------------------
# MultiMAE from the command line: exact LR schedule and resume
# ---------------------------------------------------------------------------------------------------------------

INFOBATCH_TINY = [
    "experiment=smoke",
    "selection=infobatch",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.max_epochs=8",  # epoch 0 full, 1..6 pruned, 7 anneals
    "trainer.deterministic=true",
    "model.min_lr=1e-5",
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.model_checkpoint.monitor=null",
]


def lr_per_step(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")]
    return [float(r["lr-AdamW/pg1"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


@pytest.mark.slow
def test_multimae_infobatch_lr_ends_exactly_and_resume_matches(tmp_path):
    run_train([*INFOBATCH_TINY, "hydra.run.dir=full"], cwd=tmp_path)
    full = read_summary(tmp_path / "full")
    lrs = lr_per_step(tmp_path / "full")
    assert full["optimizer_steps"] == full["planned_optimizer_steps"] == len(lrs) < 8 * 6
    assert lrs[-1] == pytest.approx(1e-5)  # min_lr on the last step, though pruned sizes were known late
    warmup, base_lr = 6, 1.2e-2 * 8 / 256  # model.warmup_epochs=1: one full epoch of 48 / 8 steps
    assert lrs[:warmup] == pytest.approx([base_lr * (i + 1) / warmup for i in range(warmup)])
    assert all(b < a for a, b in pairwise(lrs[warmup:]))  # no position used twice
    events = [json.loads(x) for x in (tmp_path / "full" / "selection.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events] == [1, 2, 3, 4, 5, 6] and all(
        e["scoring"] == "online" for e in events
    )

    checkpoint = tmp_path / "full" / "checkpoints" / "epoch_002.ckpt"
    run_train([*INFOBATCH_TINY, "hydra.run.dir=resumed", f"ckpt_path={checkpoint}"], cwd=tmp_path)
    resumed = read_summary(tmp_path / "resumed")
    assert resumed["optimizer_steps"] == full["optimizer_steps"]

    def strip(run: str) -> list[dict]:
        lines = (tmp_path / run / "selection.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if not k.endswith("time_s")} for x in lines]

    resumed_events = strip("resumed")
    assert resumed_events and resumed_events == [
        e for e in strip("full") if e["epoch"] >= resumed_events[0]["epoch"]
    ]
    assert_resumed_history_matches(resumed["history"], full["history"])
    assert lr_per_step(tmp_path / "resumed") == pytest.approx(
        lrs[-len(lr_per_step(tmp_path / "resumed")) :], rel=1e-6
    )
