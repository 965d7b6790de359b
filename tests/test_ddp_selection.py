"""DDP selection equals single-process selection: given the scores one process sees, two forked gloo ranks train
on the same global samples, in the same global order, with the same loss weights.

It holds because every rank all-gathers the scores into its own bank, seeds the selection generator by
(seed, cycle, epoch) and the shuffle by (seed, epoch), never by rank or world size, and only then takes its shard.
A rank-seeded generator, a bank that keeps only the rank's own scores (a rank-local top-k) or a rank-seeded
shuffle each make one rank, or both, differ from the single process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attent_vision.runs.callbacks import SpawnedProcessGroupCleanup
from attent_vision.selection import (
    AtteNTTeacher,
    FullPassScorer,
    HardSelector,
    InfoBatchPruner,
    IntervalSchedule,
    OnlineScorer,
    RatioSchedule,
    Selection,
    SoftSelector,
)
from attent_vision.selection.infobatch import pruned_count
from attent_vision.selection.teacher import selection_seed
from tests.conftest import ddp_strategy
from tests.toy_selection import (
    KnownScoreRegressor,
    ShardRecorder,
    ToyDataModule,
    isolate_master_port,
    known_scores,
    toy_trainer,
)

NUM_SAMPLES = 64  # even, and k = 16 and 32: both world sizes plan the same subset sizes
SEED = 7
SCORES = known_scores(NUM_SAMPLES, seed=3)  # 39 below the mean: InfoBatch prunes 20 on 1 rank and on 2

# Epochs per selection: a full epoch, then two cycles of two subset epochs and a full one (hard, soft); a full
# epoch, six pruned ones and an annealing one (InfoBatch).
EPOCHS = {"hard": 7, "soft": 7, "infobatch": 8}


def selection_parts(selection: str) -> dict:
    """The teacher's selector and scorer. Hard and soft score by a sharded, all-gathered pass (soft re-draws before
    every subset epoch); InfoBatch scores online from the training losses, all-gathered at every step."""
    if selection == "hard":
        return {"selector": HardSelector(total_cycles=2), "scorer": FullPassScorer()}
    if selection == "soft":
        return {"selector": SoftSelector(total_cycles=2), "scorer": FullPassScorer()}
    return {"selector": InfoBatchPruner(), "scorer": OnlineScorer()}


def fit(out_dir: Path, selection: str, **trainer_kwargs) -> AtteNTTeacher:
    """Trains the known-score module under a fresh teacher; each rank writes its epochs to ``out_dir/shards``."""
    teacher = AtteNTTeacher(
        **selection_parts(selection),
        ratio=RatioSchedule(kind="incremental", initial=0.25, final=0.5),
        interval=IntervalSchedule(kind="fixed", initial=2),
        seed=SEED,
        output_dir=str(out_dir),
        plot=False,
    )
    trainer = toy_trainer(
        out_dir,
        # the cleanup destroys each forked worker's process group before it exits
        [teacher, ShardRecorder(str(out_dir / "shards")), SpawnedProcessGroupCleanup()],
        max_epochs=EPOCHS[selection],
        **trainer_kwargs,
    )
    trainer.fit(KnownScoreRegressor(SCORES), datamodule=ToyDataModule(num_samples=NUM_SAMPLES, batch_size=4))
    return teacher


def epochs_of(out_dir: Path, rank: int) -> list[dict]:
    """What ``rank`` trained on, epoch by epoch: the pool, its own shard in order, the loss weights."""
    return json.loads((out_dir / "shards" / f"rank{rank}.json").read_text())


def selection_events(out_dir: Path) -> list[dict]:
    """Rank 0's ``selection.jsonl`` without timings and the global step (a rank trains half the steps)."""
    lines = (out_dir / "selection.jsonl").read_text().splitlines()
    drop = ("global_step", "scoring_time_s", "selection_time_s")
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]


def expected_selections(teacher: AtteNTTeacher) -> dict[int, Selection]:
    """What the known scores and a generator seeded by (seed, cycle, epoch) alone select, per re-selected epoch."""
    return {
        entry.epoch: teacher.selector.select(
            SCORES,
            entry,
            generator=torch.Generator().manual_seed(selection_seed(SEED, entry)),
            world_size=1,
        )
        for entry in teacher.plan
        if entry.reselect
    }


def interleave(first: list[int], second: list[int]) -> list[int]:
    """Rank 0's and rank 1's shards merged back into the order they were dealt from (positions 0, 2, ... and
    1, 3, ...)."""
    return [index for pair in zip(first, second, strict=True) for index in pair]


def test_infobatch_prunes_to_an_even_count_on_one_process_and_on_two():
    """Precondition of the comparison: both world sizes keep the same number of samples from SCORES."""
    below = int((SCORES.double() < SCORES.double().mean()).sum())
    counts = {
        world: pruned_count(below_mean=below, dataset_size=NUM_SAMPLES, prune_ratio=0.5, world_size=world)
        for world in (1, 2)
    }
    assert counts[1] == counts[2] > 0 and (NUM_SAMPLES - counts[1]) % 2 == 0


@pytest.mark.slow
@pytest.mark.parametrize("selection", list(EPOCHS))
def test_two_ranks_select_and_deal_what_one_process_does_from_the_same_scores(
    tmp_path, monkeypatch, selection
):
    """Hard, soft and InfoBatch on two forked gloo ranks pick the global samples that one process picks from the
    same scores, and deal them in the single process's order."""
    single = fit(tmp_path / "single", selection, devices=1)
    isolate_master_port(monkeypatch)
    fit(tmp_path / "ddp", selection, devices=2, strategy=ddp_strategy())
    # the workers' process groups lived and died in the forked processes; the pytest process never had one
    assert not torch.distributed.is_initialized()

    one = epochs_of(tmp_path / "single", 0)
    rank0, rank1 = epochs_of(tmp_path / "ddp", 0), epochs_of(tmp_path / "ddp", 1)
    assert len(one) == len(rank0) == len(rank1) == EPOCHS[selection]
    for alone, r0, r1 in zip(one, rank0, rank1, strict=True):
        epoch = alone["epoch"]
        assert r0["pool"] == r1["pool"] == alone["pool"], f"epoch {epoch}: the ranks trained on other samples"
        assert r0["weights"] == r1["weights"] == alone["weights"], f"epoch {epoch}: other loss weights"
        # each rank deals itself every other position of the single process's order: same seed, no rank in it
        assert interleave(r0["shard"], r1["shard"]) == alone["shard"], f"epoch {epoch}: another order"

    # The selections are the scores' and the (seed, cycle, epoch) generator's, not any rank's share of them.
    expected = expected_selections(single)
    selected = {e["epoch"]: e for e in one if e["epoch"] in expected}
    assert expected and selected.keys() == expected.keys()
    for epoch, oracle in expected.items():
        assert selected[epoch]["pool"] == oracle.indices.tolist()
        weights = None if oracle.weights is None else oracle.weights[oracle.indices].tolist()
        assert selected[epoch]["weights"] == weights
    pools = [tuple(e["pool"]) for e in one if len(e["pool"]) < NUM_SAMPLES]
    assert pools, "no epoch trained on a subset"
    if selection == "hard":  # the highest scores, every one of them
        for pool in pools:
            chosen = torch.zeros(NUM_SAMPLES, dtype=torch.bool)
            chosen[list(pool)] = True
            assert SCORES[chosen].min() > SCORES[~chosen].max()
    else:  # random draws that a rank- or step-seeded generator would change
        assert len(set(pools)) == len(pools)

    # rank 0 logged the same selections from the same all-gathered scores (quantiles and means included)
    assert selection_events(tmp_path / "ddp") == selection_events(tmp_path / "single")
