"""Training options: an EMA of the weights (``callbacks=ema``), gradient accumulation in pretraining
(``trainer.accumulate_grad_batches``) and ``module.compile`` in fine-tuning.

The end-to-end tests run ``train.py`` / ``finetune.py`` as a user does, with :class:`StepLog` added as a callback
(``+callbacks.step_log._target_=tests.test_training_options.StepLog``) to record what each optimizer step used.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import DictConfig

from attent_vision.config import ConfigError
from attent_vision.data.sampler import SubsetSampler
from attent_vision.models.checkpoint import normalize_state_dict, read_checkpoint, resolve_checkpoint
from attent_vision.runs.callbacks import EMAUpdate, EMAWeights
from attent_vision.runs.finetune import run_finetuning
from attent_vision.runs.pretrain import run_pretraining
from attent_vision.selection import InfoBatchPruner, PlanRequest, build_plan
from attent_vision.selection.plan import resolve_estimate, steps_for
from attent_vision.selection.sampling import WholeStepSampler
from tests.conftest import (
    read_summary,
    run_finetune,
    run_train,
    shared_run,
)

# ---------------------------------------------------------------------------------------------------------------
# the recorder the runs below add as a callback


class StepLog(pl.Callback):
    """Records, per optimizer step, the LR of every parameter group and the dataset indices trained on, and the
    parameters whose name starts with ``weights`` after every optimizer step; ``torch.save``s them to
    ``<path>.rank<r>`` when training ends.

    Args:
        path: Output file stem.
        weights: Name prefix of the parameters to record ("" records none).
    """

    def __init__(self, *, path: str, weights: str = "") -> None:
        self.path, self.prefix = Path(path), weights
        self.steps: dict[int, dict[str, Any]] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, _: int
    ) -> None:
        # The LR of step s is set once step s - 1 is done, so it is in place as the step's first batch starts.
        step = self.steps.setdefault(
            trainer.global_step,
            {"lrs": [g["lr"] for g in trainer.optimizers[0].param_groups], "indices": [], "batches": 0},
        )
        step["indices"] += batch["index"].tolist()
        step["batches"] += 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        done = trainer.global_step - 1
        if self.prefix and done >= 0 and done not in self.weights:
            self.weights[done] = {
                name: p.detach().clone()
                for name, p in pl_module.named_parameters()
                if name.startswith(self.prefix)
            }

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save({"steps": self.steps, "weights": self.weights}, f"{self.path}.rank{trainer.global_rank}")


def _step_log(path: Path, weights: str = "") -> list[str]:
    return [
        "+callbacks.step_log._target_=tests.test_training_options.StepLog",
        f"+callbacks.step_log.path={path}",
        f"+callbacks.step_log.weights={weights!r}" if weights else "+callbacks.step_log.weights=''",
    ]


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def _last(run_dir: Path) -> dict[str, Any]:
    return _load(run_dir / "checkpoints" / "last.ckpt")


# The smoke preset with the teacher on (soft selection, scores from the training steps): epoch 0 on all 48 samples,
# epoch 1 on a subset of 38 (k = 0.8 x 48), epoch 2 on all again; deterministic, one worker-free process.
SELECTING = [
    "experiment=smoke",
    "scoring=online",
    "trainer.max_epochs=3",
    "trainer.deterministic=true",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]
BATCH_8 = ["data.batch_size=8"]
HALF_BATCH_TWICE = ["data.batch_size=4", "trainer.accumulate_grad_batches=2"]


def _pretrain(tmp_path_factory: pytest.TempPathFactory, name: str, args: list[str]) -> Path:
    def build(cwd: Path) -> None:
        run_train([*SELECTING, *args, *_step_log(cwd / "steps"), "hydra.run.dir=run"], cwd=cwd)

    return shared_run(tmp_path_factory, f"training-options-{name}", build)


# ---------------------------------------------------------------------------------------------------------------
# gradient accumulation: the plan, the sampler, the config


@pytest.mark.parametrize(("dataset_size", "world_size"), [(48, 1), (101, 1), (1000, 1), (997, 2), (1003, 4)])
@pytest.mark.parametrize("batch_size", [2, 4, 6])
def test_half_the_batch_twice_accumulated_plans_the_same_optimizer_steps(
    dataset_size: int, world_size: int, batch_size: int
) -> None:
    """Every epoch, subset ones included, has the same optimizer steps with batch B as with B/2 accumulated twice,
    and a step is a whole window: floor(per-rank samples / (B x N)), never a smaller last one."""
    whole = build_plan(
        max_epochs=30, dataset_size=dataset_size, batch_size=batch_size, world_size=world_size, total_cycles=3
    )
    halved = build_plan(
        max_epochs=30,
        dataset_size=dataset_size,
        batch_size=batch_size // 2,
        world_size=world_size,
        accumulate=2,
        total_cycles=3,
    )
    assert [p.as_dict() for p in halved] == [p.as_dict() for p in whole]
    assert {p.kind for p in whole} == {"full", "subset"}
    for entry in halved:
        per_rank = entry.num_samples // world_size
        assert entry.num_steps == per_rank // batch_size == per_rank // (batch_size // 2) // 2
    # four batches of 3 per step: 10 per-rank samples -> 3 batches -> no whole window
    assert steps_for(1000, world_size=4, batch_size=3, accumulate=4) == 250 // 12


def test_an_estimated_epoch_resolves_to_whole_accumulation_windows() -> None:
    """InfoBatch's epochs are sized as their scores become known: the realised size is counted in windows too."""
    request = PlanRequest(max_epochs=8, dataset_size=200, batch_size=4, world_size=2, accumulate=3)
    plan = InfoBatchPruner(prune_ratio=0.5, delta=0.875).plan(request, ratio=None, interval=None)
    resolved = resolve_estimate(plan, 1, 150, request)
    assert resolved[1].num_steps == (150 // 2) // 12 == 6 and not resolved[1].estimated
    with pytest.raises(ValueError, match=r"no full optimizer step \(3 batches of 4\) per rank"):
        resolve_estimate(plan, 1, 22, request)


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_sampler_yields_whole_windows_and_the_doubled_batches_samples(world_size: int) -> None:
    """With windows of 2 x 4 samples, each rank's epoch is the prefix of the plain shard that batches of 8 train on
    (drop_last), so every optimizer step trains on the same samples either way; the cut differs per epoch."""
    pool = torch.randperm(90, generator=torch.Generator().manual_seed(1))[:61]
    for rank in range(world_size):
        plain = SubsetSampler(100, seed=3, num_replicas=world_size, rank=rank)
        windows = WholeStepSampler(100, step_samples=8, seed=3, num_replicas=world_size, rank=rank)
        left_out = []
        for epoch in range(3):
            for sampler in (plain, windows):
                sampler.set_pool(pool)
                sampler.set_epoch(epoch)
            shard = list(iter(plain))
            assert len(windows) % 8 == 0 and len(windows) == len(shard) // 8 * 8
            assert list(iter(windows)) == shard[: len(windows)]
            left_out.append(set(shard[len(windows) :]))
        assert len({frozenset(s) for s in left_out}) == 3  # a different tail every epoch
    assert (
        len(WholeStepSampler(100, seed=0)) == len(SubsetSampler(100, seed=0)) == 100
    )  # step_samples=1: unchanged


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "two"])
def test_an_invalid_accumulation_is_a_config_error_naming_the_key(
    compose_cfg: Callable[..., DictConfig], compose_finetune: Callable[..., DictConfig], value: str
) -> None:
    message = r"trainer\.accumulate_grad_batches: .* must be an integer >= 1"
    with pytest.raises(ConfigError, match=message):
        run_pretraining(compose_cfg("experiment=smoke", f"trainer.accumulate_grad_batches={value}"))
    with pytest.raises(ConfigError, match=message):
        run_finetuning(compose_finetune(f"trainer.accumulate_grad_batches={value}"))


def test_print_plan_counts_optimizer_steps_of_accumulated_batches(
    compose_cfg: Callable[..., DictConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    printed = []
    for args in (BATCH_8, HALF_BATCH_TWICE, ["data.batch_size=4"]):
        assert run_pretraining(compose_cfg("experiment=smoke", "print_plan=true", *args)) is None
        printed.append(json.loads(capsys.readouterr().out))
    whole, halved, half = printed
    assert halved == whole and [e["num_steps"] for e in whole] == [6, 4]  # 48 // 8, 38 // 8
    assert [e["num_steps"] for e in half] == [12, 9]  # without accumulation, batch 4 means twice the steps


# ---------------------------------------------------------------------------------------------------------------
# gradient accumulation end to end


@pytest.mark.slow
def test_half_the_batch_accumulated_twice_trains_step_for_step_like_the_whole_batch(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """batch 8 vs batch 4 x 2 accumulated, through a full, a subset (selected from online scores) and a full
    epoch: the same optimizer steps per epoch, the same LR of every group at every step, the same samples in every
    step, the same scores for the same sample ids, the same selection, and (up to rounding) the same losses."""
    whole_dir, halved_dir = (
        _pretrain(tmp_path_factory, n, a) for n, a in [("b8", BATCH_8), ("b4x2", HALF_BATCH_TWICE)]
    )
    whole, halved = (read_summary(d / "run") for d in (whole_dir, halved_dir))
    steps = [h["optimizer_steps"] for h in whole["history"]]
    assert steps == [6, 10, 16] and [h["optimizer_steps"] for h in halved["history"]] == steps
    assert halved["planned_optimizer_steps"] == whole["planned_optimizer_steps"] == 16
    assert halved["samples_seen"] == whole["samples_seen"] == 16 * 8

    whole_log, halved_log = (_load(d / "steps.rank0")["steps"] for d in (whole_dir, halved_dir))
    assert sorted(halved_log) == sorted(whole_log) == list(range(16))
    for step in range(16):
        assert halved_log[step]["lrs"] == whole_log[step]["lrs"], step  # exactly: the same schedule position
        assert halved_log[step]["batches"] == 2 and whole_log[step]["batches"] == 1
        assert halved_log[step]["indices"] == whole_log[step]["indices"], step
    lrs = [whole_log[s]["lrs"][0] for s in range(16)]
    assert lrs[5] == max(lrs) and lrs[-1] == pytest.approx(
        0.0, abs=1e-12
    )  # 6 warmup steps, cosine to min_lr 0

    # Online scores are recorded per batch, with their sample ids: the same ids carry the same scores.
    teachers = [_last(d / "run")["callbacks"]["AtteNTTeacher"] for d in (whole_dir, halved_dir)]
    banks = [t["bank"] for t in teachers]
    assert torch.equal(banks[0]["measured_at"], banks[1]["measured_at"])
    torch.testing.assert_close(banks[1]["scores"], banks[0]["scores"], rtol=1e-4, atol=1e-5)
    assert torch.equal(teachers[0]["subset"], teachers[1]["subset"])
    assert halved["final_train_loss"] == pytest.approx(whole["final_train_loss"], rel=1e-4)


def _interrupt_and_resume(
    tmp_path: Path, tmp_path_factory, action: str, *, exit_code: int, checkpoint_name: str
) -> tuple[dict, str, dict, dict]:
    """Runs the batch-4 x 2 selecting run with ``action`` after step 2, then the same command again.

    Returns the checkpoint the interruption left, the rerun's stderr, and the rerun's and the uninterrupted run's
    step logs; asserts that the rerun ends with the uninterrupted run's step count and weights, bit for bit."""
    uninterrupted = _pretrain(tmp_path_factory, "b4x2", HALF_BATCH_TWICE) / "run"
    run_dir = tmp_path / "run"
    args = [*SELECTING, *HALF_BATCH_TWICE, f"hydra.run.dir={run_dir}"]
    sabotage = _sabotage("sabotage", action, 2, tmp_path / "fired")
    interrupted = run_train([*args, *sabotage], cwd=tmp_path, check=False)
    assert interrupted.returncode == exit_code, interrupted.stderr[-3000:]
    checkpoint = _load(run_dir / "checkpoints" / checkpoint_name)
    again = run_train([*args, *sabotage, *_step_log(tmp_path / "steps")], cwd=tmp_path)
    resumed, full = _last(run_dir), _last(uninterrupted)
    assert resumed["global_step"] == full["global_step"] == 16
    for name, value in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    logs = (_load(tmp_path / "steps.rank0")["steps"], _load(uninterrupted.parent / "steps.rank0")["steps"])
    return checkpoint, again.stderr, *logs


@pytest.mark.slow
def test_a_stop_signal_inside_an_accumulation_window_waits_for_its_step(
    tmp_path: Path, tmp_path_factory
) -> None:
    """SIGTERM after step 2 arrives as window 3 begins: the run trains the window's second batch, steps, and
    stops there (under DDP a window's partial gradients are each rank's own, so no checkpoint could hold them);
    the resumed run ends exactly where the uninterrupted run does."""
    checkpoint, stderr, resumed_log, full_log = _interrupt_and_resume(
        tmp_path, tmp_path_factory, "signal:SIGTERM", exit_code=143, checkpoint_name="stopped.ckpt"
    )
    assert checkpoint["global_step"] == 3 and checkpoint["callbacks"]["AtteNTTeacher"]["window_batches"] == 0
    assert "window_gradients" not in checkpoint
    assert "Resuming from checkpoints/stopped.ckpt (epoch 0, step 3)" in stderr
    assert sorted(resumed_log) == list(range(3, 16))
    assert all(resumed_log[s] == full_log[s] for s in range(3, 16))


@pytest.mark.slow
def test_a_crash_inside_an_accumulation_window_resumes_exactly(tmp_path: Path, tmp_path_factory) -> None:
    """An exception after the first batch of window 3: the crash checkpoint holds that batch's gradients, the
    resumed run trains the window's second batch on top of them, and ends exactly where the uninterrupted run
    does (one process)."""
    checkpoint, stderr, resumed_log, full_log = _interrupt_and_resume(
        tmp_path, tmp_path_factory, "raise-in-window", exit_code=1, checkpoint_name="on_exception.ckpt"
    )
    assert checkpoint["global_step"] == 2 and checkpoint["callbacks"]["AtteNTTeacher"]["window_batches"] == 1
    gradients = checkpoint["window_gradients"]
    assert gradients and set(gradients) <= set(checkpoint["state_dict"])
    assert any(bool(g.abs().sum() > 0) for g in gradients.values())
    assert "Resuming from checkpoints/on_exception.ckpt (epoch 0, step 2)" in stderr
    # The window in flight goes on with its second batch; no sample is trained twice or skipped.
    assert resumed_log[2]["batches"] == 1 and resumed_log[2]["indices"] == full_log[2]["indices"][4:]
    assert all(resumed_log[s] == full_log[s] for s in range(3, 16))


@pytest.mark.slow
def test_two_ranks_accumulating_train_like_one_process_with_the_global_batch(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """trainer=ddp_cpu (2 gloo ranks) with batch 2 x 2 accumulated: a global batch of 8, as batch 8 on one process.
    The same optimizer steps per epoch and LR at every step, and each step trains the same 8 samples (each rank
    its shard's window), scored under the same ids (all-gathered) and selected the same."""
    single = _pretrain(tmp_path_factory, "b8", BATCH_8)
    args = [*SELECTING, "trainer=ddp_cpu", "data.batch_size=2", "trainer.accumulate_grad_batches=2"]
    run_train([*args, *_step_log(tmp_path / "steps"), "hydra.run.dir=run"], cwd=tmp_path, timeout=600)
    summary, expected = read_summary(tmp_path / "run"), read_summary(single / "run")
    assert [h["optimizer_steps"] for h in summary["history"]] == [6, 10, 16]
    assert summary["samples_seen"] == expected["samples_seen"] == 16 * 8
    logs = [_load(tmp_path / f"steps.rank{r}")["steps"] for r in (0, 1)]
    reference = _load(single / "steps.rank0")["steps"]
    for step in range(16):
        assert logs[0][step]["lrs"] == logs[1][step]["lrs"] == reference[step]["lrs"], step
        assert logs[0][step]["batches"] == logs[1][step]["batches"] == 2
        assert sorted(logs[0][step]["indices"] + logs[1][step]["indices"]) == sorted(
            reference[step]["indices"]
        )
    teacher, expected_teacher = (
        _last(d)["callbacks"]["AtteNTTeacher"] for d in (tmp_path / "run", single / "run")
    )
    torch.testing.assert_close(
        teacher["bank"]["scores"], expected_teacher["bank"]["scores"], rtol=1e-4, atol=1e-5
    )
    assert torch.equal(teacher["subset"], expected_teacher["subset"])


# ---------------------------------------------------------------------------------------------------------------
# EMA of the weights


def test_the_ema_update_follows_its_decay_and_warmup() -> None:
    plain, warm = EMAUpdate(decay=0.9), EMAUpdate(decay=0.9, warmup=True, warmup_power=0.75)
    assert plain.decay_after(1) == plain.decay_after(10**6) == 0.9
    assert warm.decay_after(1) == pytest.approx(1 - 2**-0.75) and warm.decay_after(10**6) == 0.9
    decays = [warm.decay_after(n) for n in range(1, 40)]
    assert decays == sorted(decays) and decays[0] < 0.5
    # AveragedModel calls it once per device and dtype group: floats move by (1 - decay), integers are copied.
    average, current = [torch.zeros(3), torch.full((2,), 2.0)], [torch.ones(3), torch.full((2,), 4.0)]
    plain(average, current, torch.tensor(3))
    torch.testing.assert_close(average, [torch.full((3,), 0.1), torch.full((2,), 2.2)])
    counters = [torch.tensor([4, 5])]
    plain(counters, [torch.tensor([7, 9])], torch.tensor(3))
    assert counters[0].tolist() == [7, 9]
    ema = EMAWeights(decay=0.5, update_every_n_steps=3, update_starting_at_step=4)
    assert [s for s in range(12) if ema.should_update(step_idx=s)] == [0, 1, 2, 3, 4, 7, 10]
    assert not ema.should_update(epoch_idx=0)
    for bad, key in [({"decay": 1.0}, "decay"), ({"update_every_n_steps": 0}, "update_every_n_steps")]:
        with pytest.raises(ValueError, match=f"callbacks.ema.{key}"):
            EMAWeights(**bad)


# The teacher scores before every selection with a full pass, right after a validation (every epoch here), so a
# scoring pass on the averaged weights would show in its scores.
SCORED = [
    "experiment=smoke",
    "trainer.max_epochs=3",
    "trainer.check_val_every_n_epoch=1",
    "trainer.deterministic=true",
    "trainer.enable_progress_bar=false",
    "data.synthetic.num_val=32",  # 4 validation batches: a stop can come between two
    "logger=csv",
]
EMA = [
    "callbacks=ema",
    "callbacks.ema.decay=0.6",
    "callbacks.ema.warmup=true",
    "callbacks.ema.update_every_n_steps=2",
]
RECORDED = "net.encoder.3."  # the parameters StepLog keeps after every step


def _scored_run(tmp_path_factory: pytest.TempPathFactory, name: str, args: list[str]) -> Path:
    def build(cwd: Path) -> None:
        run_train([*SCORED, *args, *_step_log(cwd / "steps", RECORDED), "hydra.run.dir=run"], cwd=cwd)

    return shared_run(tmp_path_factory, f"training-options-{name}", build)


@pytest.mark.slow
def test_ema_checkpoints_hold_the_average_of_the_trained_steps_while_training_and_scoring_stay_unchanged(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    plain_dir, ema_dir = _scored_run(tmp_path_factory, "plain", []), _scored_run(tmp_path_factory, "ema", EMA)
    plain, ema = _last(plain_dir / "run"), _last(ema_dir / "run")
    assert ema["global_step"] == 16 and int(ema["averaging_state"]["n_averaged"]) == 8  # steps 0, 2, ..., 14

    # Training is untouched: the trained weights and the teacher's scores and subsets are the plain run's. (The
    # teacher scored right after each validation, which ran on the average: it scored the trained weights.)
    assert ema["current_model_state"].keys() == plain["state_dict"].keys() == ema["state_dict"].keys()
    for name, value in plain["state_dict"].items():
        assert torch.equal(ema["current_model_state"][name], value), name
    teachers = [c["callbacks"]["AtteNTTeacher"] for c in (plain, ema)]
    assert torch.equal(teachers[0]["bank"]["scores"], teachers[1]["bank"]["scores"])
    assert torch.equal(teachers[0]["subset"], teachers[1]["subset"])
    summaries = [read_summary(d / "run") for d in (plain_dir, ema_dir)]
    assert summaries[1]["final_train_loss"] == summaries[0]["final_train_loss"]
    assert summaries[1]["final_val_loss"] != summaries[0]["final_val_loss"]  # validation measures the average

    # state_dict holds the EMA of the weights after steps 0, 2, ..., 14 (warmup: decay min(0.6, 1 - (1+n)^-3/4)).
    trained = _load(ema_dir / "steps.rank0")["weights"]
    update = EMAUpdate(decay=0.6, warmup=True)
    expected = dict(trained[0])
    for n, step in enumerate(range(2, 16, 2), start=1):
        weight = 1 - update.decay_after(n)
        expected = {k: v + weight * (trained[step][k] - v) for k, v in expected.items()}
    assert expected
    for name, value in expected.items():
        torch.testing.assert_close(ema["state_dict"][name], value, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(ema["state_dict"][name], ema["current_model_state"][name], atol=1e-5), name

    # finetune.py pretrained=<run dir> reads the average.
    encoder = normalize_state_dict(read_checkpoint(resolve_checkpoint(ema_dir / "run")))
    averaged = {k.removeprefix("net."): v for k, v in ema["state_dict"].items() if k.startswith("net.")}
    assert encoder.keys() == averaged.keys()
    assert all(torch.equal(encoder[k], averaged[k]) for k in encoder)


def _sabotage(name: str, action: str, step: int, marker: Path) -> list[str]:
    return [
        f"+callbacks.{name}._target_=tests.sabotage.Sabotage",
        f"+callbacks.{name}.at_step={step}",
        f"+callbacks.{name}.action={action}",
        f"+callbacks.{name}.marker={marker}",
    ]


@pytest.mark.slow
def test_a_stopped_ema_run_resumes_its_average_and_its_training_exactly(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SIGTERM in the middle of the subset epoch, then the same command, SIGTERM again while it validates (the
    average swapped in), then the same command: the last checkpoint's average, trained weights and update count
    equal those of the run that never stopped."""
    uninterrupted = _last(_scored_run(tmp_path_factory, "ema", EMA) / "run")
    args = [*SCORED, *EMA, "hydra.run.dir=run"]
    stops = [
        *_sabotage("mid_epoch", "signal:SIGTERM", 7, tmp_path / "fired-mid-epoch"),
        *_sabotage("validating", "signal-in-validation:SIGTERM", 10, tmp_path / "fired-validating"),
    ]
    stopped_ckpt = tmp_path / "run" / "checkpoints" / "stopped.ckpt"
    assert run_train([*args, *stops], cwd=tmp_path, check=False).returncode == 143
    stopped = _load(stopped_ckpt)
    assert stopped["global_step"] == 8 and int(stopped["averaging_state"]["n_averaged"]) == 4
    again = run_train([*args, *stops], cwd=tmp_path, check=False)
    assert (
        again.returncode == 143 and "Resuming from checkpoints/stopped.ckpt (epoch 1, step 8)" in again.stderr
    )
    assert "Stopped by SIGTERM at epoch 1, step 10" in again.stderr, again.stderr[-2000:]
    stopped = _load(stopped_ckpt)
    assert stopped["global_step"] == 10 and int(stopped["averaging_state"]["n_averaged"]) == 5
    run_train([*args, *stops], cwd=tmp_path)
    resumed = _last(tmp_path / "run")
    assert int(resumed["averaging_state"]["n_averaged"]) == 8
    for key in ("state_dict", "current_model_state"):
        for name, value in uninterrupted[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)


# ---------------------------------------------------------------------------------------------------------------
# fine-tuning: EMA and compile

# Two optimizer steps on 16 images and one validation batch of 8: every batch has the same shape, so a compiled
# network compiles once for training and once for evaluation.
FINETUNE = [
    "task=cls",
    "data.synthetic.num_train=16",
    "data.synthetic.num_eval=8",
    "data.synthetic.image_size=40",
    "data.input_size=32",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "~callbacks.prediction_gallery",
    "logger=csv",
]


def _finetune_run(tmp_path_factory: pytest.TempPathFactory, name: str, args: list[str]) -> Path:
    def build(cwd: Path) -> None:
        run_finetune([*FINETUNE, *args, "hydra.run.dir=run"], cwd=cwd, timeout=600)

    return shared_run(tmp_path_factory, f"training-options-ft-{name}", build) / "run"


@pytest.mark.slow
def test_finetuning_with_ema_validates_and_checkpoints_the_average(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    plain_dir, ema_dir = (
        _finetune_run(tmp_path_factory, n, a) for n, a in [("plain", []), ("ema", ["callbacks=ema"])]
    )
    plain, ema = _last(plain_dir), _last(ema_dir)
    assert int(ema["averaging_state"]["n_averaged"]) == ema["global_step"] == 2
    for name, value in plain["state_dict"].items():
        assert torch.equal(ema["current_model_state"][name], value), name  # training is unchanged
    assert ema["state_dict"].keys() == plain["state_dict"].keys()
    moved = [k for k, v in ema["state_dict"].items() if not torch.equal(v, ema["current_model_state"][k])]
    assert moved, "the average equals the trained weights"
    best = _load(next((ema_dir / "checkpoints").glob("best_epoch_*.ckpt")))
    assert all(torch.equal(best["state_dict"][k], v) for k, v in ema["state_dict"].items())
    val_losses = [read_summary(d)["final_val_loss"] for d in (plain_dir, ema_dir)]
    assert val_losses[0] != val_losses[1]  # validated on the average


@pytest.mark.slow
def test_finetuning_with_compile_trains_and_keeps_the_checkpoint_keys(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """module.compile=true, as model.compile in pretraining: the network is compiled in place, so the checkpoint's
    keys are the uncompiled run's (no ``_orig_mod.``) and pretrained= / resume read it unchanged. (About a minute on
    two cores: inductor compiles the training and the evaluation graph.)"""
    plain = _last(_finetune_run(tmp_path_factory, "plain", []))
    compiled_dir = _finetune_run(tmp_path_factory, "compiled", ["module.compile=true"])
    compiled = _last(compiled_dir)
    assert compiled["hyper_parameters"]["compile"] is True and compiled["global_step"] == 2
    assert list(compiled["state_dict"]) == list(plain["state_dict"])
    for name, value in plain["state_dict"].items():
        torch.testing.assert_close(compiled["state_dict"][name], value, rtol=1e-3, atol=1e-4)
    assert read_summary(compiled_dir)["status"] == "finished"
