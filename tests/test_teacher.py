"""The AtteNT teacher driving real Lightning training: model-agnostic use, DDP sharding, LR schedule, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from attent_vision.lightning.optim import warmup_cosine_lr
from attent_vision.runs.callbacks import SpawnedProcessGroupCleanup
from attent_vision.selection import (
    AtteNTTeacher,
    FullPassScorer,
    HardSelector,
    InfoBatchPruner,
    IntervalSchedule,
    OnlineScorer,
    RatioSchedule,
    SoftSelector,
    TeacherSetupError,
)
from tests.conftest import (
    assert_resumed_history_matches,
    ddp_strategy,
    read_summary,
    run_train,
    shared_run,
)
from tests.toy_selection import (
    LossProportional,
    ShardRecorder,
    ToyDataModule,
    ToyRegressor,
    isolate_master_port,
    toy_trainer,
)

SCORERS = {"full": FullPassScorer, "online": OnlineScorer}


def make_teacher(tmp_path: Path, *, selector=None, scoring: str = "full", **kwargs) -> AtteNTTeacher:
    defaults = dict(
        selector=selector or HardSelector(total_cycles=2),
        scorer=SCORERS[scoring](),
        ratio=RatioSchedule(kind="incremental", initial=0.25, final=0.5),
        interval=IntervalSchedule(kind="fixed", initial=2),
        seed=3,
        output_dir=str(tmp_path),
        plot=False,
    )
    return AtteNTTeacher(**{**defaults, **kwargs})


def test_teacher_drives_a_non_multimae_module(tmp_path):
    """Model-agnostic: any module reporting per-sample losses with indices; hard selection takes the noisiest."""
    torch.manual_seed(0)
    teacher = make_teacher(tmp_path)
    recorder = ShardRecorder(str(tmp_path / "shards"))
    trainer = toy_trainer(tmp_path, [teacher, recorder])
    trainer.fit(ToyRegressor(), datamodule=ToyDataModule(num_samples=64, batch_size=4))

    # plan: 1 full + cycle 0 (3 epochs: 2 subset, 1 full) + cycle 1 (3 epochs: 2 subset, 1 full)
    kinds = [p.kind for p in teacher.plan]
    assert kinds == ["full", "subset", "subset", "full", "subset", "subset", "full"]
    records = json.loads((tmp_path / "shards" / "rank0.json").read_text())
    for record, step in zip(records, teacher.plan, strict=True):
        assert record["steps"] == step.num_steps
        assert len(record["seen"]) == step.num_steps * 4
        assert len(record["pool"]) == step.num_samples
    # ratio 0.25 then 0.5 of 64 samples
    assert [e["k"] for e in teacher.history] == [16, 32]
    # hard top-k on squared error: the selected samples have the highest scores of the bank at that time
    events = [json.loads(line) for line in (tmp_path / "selection.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events] == [1, 4]
    assert all(e["selected_score_mean"] > e["all_score_mean"] for e in events)
    # the hard samples are the noisiest, i.e. the highest indices of NoisyRegression
    assert records[1]["pool"] == list(range(48, 64))
    assert records[4]["pool"] == list(range(32, 64))
    assert set(events[0]["class_histogram"]) <= {"0", "1", "2", "3"}
    assert sum(events[0]["class_histogram"].values()) == 16


def test_online_scoring_reuses_training_losses_without_a_scoring_pass(tmp_path):
    teacher = make_teacher(tmp_path, scoring="online")
    trainer = toy_trainer(tmp_path, [teacher])
    module = ToyRegressor()
    calls = []
    original = module.score_batch
    module.score_batch = lambda *a, **k: calls.append(1) or original(*a, **k)
    trainer.fit(module, datamodule=ToyDataModule(num_samples=64, batch_size=4))
    assert calls == []
    assert teacher.bank.coverage() == 1.0  # the initial full epoch scored every sample
    assert len(teacher.history) == 2


def test_a_new_strategy_is_one_class(tmp_path):
    """A user's selector (tests/toy_selection.py, 8 lines) runs through the teacher unchanged."""
    teacher = make_teacher(tmp_path, selector=LossProportional(total_cycles=2, reselect="every"))
    trainer = toy_trainer(tmp_path, [teacher])
    trainer.fit(ToyRegressor(), datamodule=ToyDataModule(num_samples=64, batch_size=4))
    assert [e["strategy"] for e in teacher.history] == ["lossprop"] * 4
    assert [e["k"] for e in teacher.history] == [16, 16, 32, 32]
    # drawn in proportion to the squared noise: the selected samples are the harder ones on average
    assert all(e["selected_score_mean"] > e["all_score_mean"] for e in teacher.history)
    assert teacher.summary_fields()["selection"]["strategy"] == "lossprop"


def test_cycle_refresh_scores_once_per_cycle_and_re_draws_from_the_same_scores(tmp_path):
    """scoring.refresh=cycle: soft re-draws before every subset epoch, but only the first of a cycle scores."""
    teacher = make_teacher(
        tmp_path,
        selector=SoftSelector(total_cycles=2, temperature=0.5),
        scorer=FullPassScorer(refresh="cycle"),
    )
    module = ToyRegressor()
    passes = []
    original = module.score_batch
    module.score_batch = lambda batch, **kw: passes.append(len(batch["index"])) or original(batch, **kw)
    toy_trainer(tmp_path, [teacher]).fit(module, datamodule=ToyDataModule(num_samples=64, batch_size=4))
    assert [e["epoch"] for e in teacher.history] == [1, 2, 4, 5]
    assert [e["scored"] for e in teacher.history] == [True, False, True, False]
    assert teacher.scoring_passes == 2 and sum(passes) == 2 * 64
    first, second = teacher.history[0], teacher.history[1]
    assert first["score_median"] == second["score_median"]  # the same bank, another Gumbel draw
    assert first["overlap_with_previous"] is None and second["overlap_with_previous"] < 1.0


class Unscorable(pl.LightningModule):
    """Trains like ToyRegressor but has neither score_batch nor set_sample_weights."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ToyRegressor()

    def training_step(self, batch, batch_idx):
        return self.inner.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return self.inner.configure_optimizers()


class NoSamplerData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.batch_size = ToyDataModule(), 4

    def train_dataset(self):
        return self.inner.train_dataset()

    def train_dataloader(self):
        return self.inner.train_dataloader()


def test_contract_errors_name_the_missing_member_and_its_signature(tmp_path):
    with pytest.raises(TeacherSetupError) as info:
        toy_trainer(tmp_path, [make_teacher(tmp_path)]).fit(Unscorable(), datamodule=ToyDataModule())
    message = str(info.value)
    assert "`score_batch(batch, *, seed: int | None) -> Tensor (B,)` (ScorableModule)" in message
    assert "scoring=online" in message

    infobatch = make_teacher(tmp_path, selector=InfoBatchPruner(), scoring="online")
    with pytest.raises(TeacherSetupError) as info:
        toy_trainer(tmp_path, [infobatch]).fit(Unscorable(), datamodule=ToyDataModule())
    assert "`set_sample_weights(weights: Tensor | None) -> None` (WeightedLossModule)" in str(info.value)
    assert "selection=infobatch" in str(info.value) and "score_batch" not in str(info.value)

    with pytest.raises(TeacherSetupError) as info:
        toy_trainer(tmp_path, [make_teacher(tmp_path)]).fit(ToyRegressor(), datamodule=NoSamplerData())
    assert "`set_train_sampler(sampler: Sampler[int]) -> None` (SelectableDataModule)" in str(info.value)


def test_teacher_refuses_a_trainer_that_would_rewrap_its_sampler(tmp_path):
    teacher = make_teacher(tmp_path)
    trainer = pl.Trainer(
        max_epochs=7,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[teacher],
    )
    with pytest.raises(
        TeacherSetupError, match=r"use_distributed_sampler must be false.*reload_dataloaders_every_n_epochs"
    ):
        trainer.fit(ToyRegressor(), datamodule=ToyDataModule())


@pytest.mark.slow
@pytest.mark.parametrize(("scoring", "num_samples"), [("full", 67), ("online", 66)])
def test_two_process_ddp_ranks_share_the_subset_and_split_it(tmp_path, monkeypatch, scoring, num_samples):
    """gloo DDP with 2 forked CPU processes: same subset on both ranks, disjoint equal shards covering it, same
    steps. Both parameters run in one pytest process: the second fit finds no process group left by the first."""
    teacher = make_teacher(tmp_path, selector=SoftSelector(total_cycles=2), seed=5, scoring=scoring)
    recorder = ShardRecorder(str(tmp_path / "shards"))
    isolate_master_port(monkeypatch)
    # The cleanup destroys each worker's group before the forked worker exits; the pytest process never has one.
    trainer = toy_trainer(
        tmp_path, [teacher, recorder, SpawnedProcessGroupCleanup()], devices=2, strategy=ddp_strategy()
    )
    trainer.fit(ToyRegressor(), datamodule=ToyDataModule(num_samples=num_samples, batch_size=4))
    assert not torch.distributed.is_initialized()
    plan = teacher.make_plan(max_epochs=7, dataset_size=num_samples, batch_size=4, world_size=2)
    ranks = [json.loads((tmp_path / "shards" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 7
    for r0, r1, step in zip(*ranks, plan, strict=True):
        assert r0["pool"] == r1["pool"], f"epoch {r0['epoch']}: ranks hold different subsets"
        assert r0["len"] == r1["len"] and r0["steps"] == r1["steps"] == step.num_steps
        assert not set(r0["shard"]) & set(r1["shard"])
        union = set(r0["shard"]) | set(r1["shard"])
        assert len(union) == len(r0["shard"]) * 2
        assert len(set(r0["pool"]) - union) == len(r0["pool"]) % 2  # a full epoch over 67 leaves out 1
    subset_sizes = [len(r["pool"]) for r in ranks[0] if len(r["pool"]) < num_samples]
    assert subset_sizes == [p.num_samples for p in plan if p.kind == "subset"]
    assert all(size % 2 == 0 for size in subset_sizes)  # k rounded down to a multiple of the world size


def test_datamodule_hands_back_one_loader_whose_length_follows_the_teacher(compose_cfg):
    """Lightning re-requests the loader every epoch; the same object keeps persistent workers alive."""
    import hydra

    from attent_vision.selection import SubsetSampler

    cfg = compose_cfg("experiment=smoke")
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    sampler = SubsetSampler(len(datamodule.train_dataset()), seed=0)
    datamodule.set_train_sampler(sampler)
    loader = datamodule.train_dataloader()
    assert len(loader) == 48 // 8
    sampler.set_pool(torch.arange(0, 48, 3, dtype=torch.int64))  # 16 samples
    assert datamodule.train_dataloader() is loader
    assert len(loader) == 16 // 8
    assert sorted(int(i) for b in loader for i in b["index"]) == list(range(0, 48, 3))


def test_training_augmentation_is_a_function_of_seed_epoch_and_index(compose_cfg):
    """Resume- and worker-independent augmentation: same (epoch, index) -> same crop; global RNG untouched."""
    import hydra

    from attent_vision.data.datamodule import SeededAugmentation

    cfg = compose_cfg("experiment=smoke")
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    augmented = SeededAugmentation(datamodule.train_dataset(), seed=0)
    first, again, next_epoch = augmented[(5, 1)], augmented[(5, 1)], augmented[(5, 2)]
    assert torch.equal(first["rgb"], again["rgb"]) and torch.equal(first["semseg"], again["semseg"])
    assert not torch.equal(first["rgb"], next_epoch["rgb"])
    state = torch.get_rng_state()
    augmented[(9, 4)]
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------------------------------------------------------
# MultiMAE from the command line: LR schedule, observability and resume, against one uninterrupted reference run


def lr_per_step(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")]
    return [float(r["lr-AdamW/pg1"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


ATTENT_TINY = [
    "experiment=smoke",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.max_epochs=6",
    "selection=soft",
    "selection.total_cycles=2",
    "interval=fixed",
    "interval.initial=2",
    "ratio.initial=0.35",
    "ratio.final=0.7",
    "model.min_lr=1e-5",
]

# The settings of the uninterrupted run that the LR test and the three resume tests read, and of every run those
# tests start from its checkpoints. Deterministic, validated every 2nd epoch (so resumed runs compare validation
# losses too), with two kinds of checkpoint: checkpoints/epoch_NNN.ckpt at every training epoch's end (after the
# teacher prepared the next epoch), and val_checkpoints/epoch_NNN.ckpt at the end of every 2nd epoch's
# validation, before the teacher's epoch-end hooks (Lightning's default writes only at the training epoch's end).
REFERENCE = [
    *ATTENT_TINY,
    "trainer.deterministic=true",
    "trainer.check_val_every_n_epoch=2",
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.model_checkpoint.monitor=null",
    "+callbacks.val_checkpoint._target_=attent_vision.runs.checkpointing.SafeModelCheckpoint",
    "+callbacks.val_checkpoint.dirpath=${paths.output_dir}/val_checkpoints",
    "+callbacks.val_checkpoint.filename='epoch_{epoch:03d}'",
    "+callbacks.val_checkpoint.auto_insert_metric_name=false",
    "+callbacks.val_checkpoint.save_top_k=-1",
    "+callbacks.val_checkpoint.every_n_epochs=2",
    "+callbacks.val_checkpoint.save_on_train_epoch_end=false",
]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted REFERENCE run's directory, trained once per session. Tests only read it: their resumed
    and crashing runs go to their own ``tmp_path``."""

    def build(cwd: Path) -> None:
        run_train([*REFERENCE, "hydra.run.dir=full"], cwd=cwd)

    return shared_run(tmp_path_factory, "teacher-reference", build) / "full"


def selection_events(run_dir: Path) -> list[dict]:
    """The run's ``selection.jsonl`` without its timings (which no two runs share)."""
    lines = (run_dir / "selection.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("time_s")} for line in lines]


def test_lr_schedule_spans_the_plan_and_ends_at_min_lr(reference_run):
    run_dir = reference_run
    summary = read_summary(run_dir)
    lrs = lr_per_step(run_dir)
    total = summary["planned_optimizer_steps"]
    assert summary["optimizer_steps"] == total == len(lrs)
    base_lr = 1.2e-2 * 8 / 256
    warmup = 6  # one full epoch of 48 / 8 steps
    expected = [
        warmup_cosine_lr(i, base_lr=base_lr, min_lr=1e-5, warmup_steps=warmup, total_steps=total)
        for i in range(total)
    ]
    assert lrs == pytest.approx(expected, rel=1e-5)
    assert lrs[-1] == pytest.approx(1e-5)
    assert len(set(lrs[warmup:])) == total - warmup  # no schedule position used twice

    # observability: one selection.jsonl line per re-selection, the summary fields and the plot
    events = [json.loads(line) for line in (run_dir / "selection.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events] == [1, 2, 3, 4]  # soft re-draws before every subset epoch
    for event in events:
        assert {
            "cycle",
            "ratio",
            "k",
            "scoring_time_s",
            "score_min",
            "score_median",
            "score_max",
            "overlap_with_previous",
            "class_histogram",
        } <= set(event)
        assert event["score_min"] <= event["score_median"] <= event["score_max"]
        assert sum(event["class_histogram"].values()) == event["k"]
    assert events[0]["overlap_with_previous"] is None and 0 <= events[1]["overlap_with_previous"] <= 1
    assert [e["k"] for e in events] == [16, 16, 33, 33]  # floor(48 x 0.35), floor(48 x 0.7)
    assert summary["scoring_time_s"] > 0 and summary["reselections"] == 4
    assert summary["selection"]["strategy"] == "soft" and summary["selection"]["scoring"] == "full"
    assert (run_dir / "selection.png").stat().st_size > 10_000
    with open(run_dir / "csv" / "metrics.csv") as f:
        assert "teacher/ratio" in next(csv.reader(f))


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_matches_an_uninterrupted_run(tmp_path, reference_run):
    checkpoint = reference_run / "checkpoints" / "epoch_002.ckpt"
    assert checkpoint.is_file()
    run_train([*REFERENCE, "hydra.run.dir=resumed", f"ckpt_path={checkpoint}"], cwd=tmp_path)

    # The checkpoint may be taken before or after the teacher prepared epoch 3; either way the resumed run
    # makes exactly the uninterrupted run's later selections (and trains epoch 3 on the same subset, see losses).
    resumed_events = selection_events(tmp_path / "resumed")
    assert resumed_events, "the resumed run made no selection"
    first = resumed_events[0]["epoch"]
    assert first in (3, 4)
    assert resumed_events == [e for e in selection_events(reference_run) if e["epoch"] >= first]
    resumed = read_summary(tmp_path / "resumed")
    assert [h["epoch"] for h in resumed["history"]] == [3, 4, 5]
    assert_resumed_history_matches(resumed["history"], read_summary(reference_run)["history"])
    assert resumed["optimizer_steps"] == read_summary(reference_run)["optimizer_steps"]


def _losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    return {h["epoch"]: (h["train_loss"], h.get("val_loss")) for h in read_summary(run_dir)["history"]}


@pytest.mark.slow
def test_resume_from_a_mid_epoch_crash_checkpoint_matches_an_uninterrupted_run(tmp_path, reference_run):
    """The crash checkpoint lands mid-epoch (3 of epoch 0's 6 steps done): the resumed run skips the batches
    already trained, makes the same selections and ends where the uninterrupted run ends."""
    crashed = run_train(
        [
            *REFERENCE,
            "hydra.run.dir=crashed",
            "+callbacks.crash._target_=tests.toy_selection.CrashAtStep",
            "+callbacks.crash.step=3",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert crashed.returncode != 0 and "simulated crash at step 3" in crashed.stderr
    checkpoint = tmp_path / "crashed" / "checkpoints" / "on_exception.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 3
    run_train([*REFERENCE, "hydra.run.dir=resumed", f"ckpt_path={checkpoint}"], cwd=tmp_path)
    full, resumed = read_summary(reference_run), read_summary(tmp_path / "resumed")
    assert resumed["optimizer_steps"] == full["optimizer_steps"]
    assert resumed["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-5)
    assert sorted(h["epoch"] for h in resumed["history"]) == [0, 1, 2, 3, 4, 5]
    # epoch 0 was trained across the crash: its mean train loss covers only the resumed half
    after_crash = [h for h in resumed["history"] if h["epoch"] >= 1]
    assert_resumed_history_matches(after_crash, full["history"], rel=1e-5)
    assert selection_events(tmp_path / "resumed") == selection_events(reference_run)


@pytest.mark.slow
def test_resume_from_a_checkpoint_taken_before_the_epoch_end_hooks(tmp_path, reference_run):
    """A checkpoint written at validation end, before the teacher prepares the next epoch (the reference run's
    val_checkpoints); the resumed run must neither re-select twice nor select differently."""
    checkpoint = reference_run / "val_checkpoints" / "epoch_001.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    teacher_state = state["callbacks"]["AtteNTTeacher"]
    assert teacher_state["last_ended_epoch"] == 0 and teacher_state["prepared_epoch"] == 1
    run_train([*REFERENCE, "hydra.run.dir=resumed", f"ckpt_path={checkpoint}"], cwd=tmp_path)

    assert selection_events(tmp_path / "resumed") == [
        e for e in selection_events(reference_run) if e["epoch"] >= 2
    ]
    # Epoch 1 only finishes its end hooks in the resumed run (no batch left), so compare from epoch 2 on.
    full_losses, resumed_losses = _losses(reference_run), _losses(tmp_path / "resumed")
    assert sorted(e for e in resumed_losses if e >= 2) == [2, 3, 4, 5]
    for epoch in (2, 3, 4, 5):
        assert resumed_losses[epoch][0] == pytest.approx(full_losses[epoch][0], rel=1e-5)
    assert read_summary(tmp_path / "resumed")["reselections"] == read_summary(reference_run)["reselections"]
