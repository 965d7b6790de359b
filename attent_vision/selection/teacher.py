"""The AtteNT teacher as a Lightning callback: it coordinates the parts Hydra builds and keeps their state.

The parts: a :class:`~attent_vision.selection.selectors.Selector` (plans the epochs and picks each pool), a
:class:`~attent_vision.selection.scoring.Scorer` (fills the score bank), the ratio and interval schedules, and
the plan the selector builds from them. The callback runs scoring and selection at the epochs the plan marks,
shards the pool through the sampler, hands loss weights and exact step counts to the module, logs what it did,
and saves everything a resume needs. It switches on no strategy names. The contract it checks is written as
protocols in ``contracts.py``.
"""

from __future__ import annotations

import bisect
import logging
import time
from itertools import accumulate
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from attent_vision.seeds import capture_rng_state, restore_rng_state, stream_seed
from attent_vision.selection.contracts import (
    LabelledDataModule,
    PlannedSchedule,
    ResizableSchedule,
    SelectionSnapshot,
    TeacherSetupError,
    WeightedLossModule,
    missing,
    trainer_problems,
)
from attent_vision.selection.events import selection_event, write_event
from attent_vision.selection.plan import (
    EpochPlan,
    PlanRequest,
    first_reselection_of_cycle,
    plan_totals,
    resolve_estimate,
)
from attent_vision.selection.sampling import WholeStepSampler
from attent_vision.selection.schedules import IntervalSchedule, RatioSchedule
from attent_vision.selection.score_bank import ScoreBank
from attent_vision.selection.scoring import FullPassScorer, Scorer
from attent_vision.selection.selectors import Selection, Selector, SoftSelector

log = logging.getLogger(__name__)

__all__ = ["AtteNTTeacher", "TeacherSetupError"]


def selection_seed(seed: int, epoch: EpochPlan) -> int:
    """The selection generator's seed: a function of (seed, cycle, epoch), identical on every rank."""
    return stream_seed("selection", seed, -1 if epoch.cycle is None else epoch.cycle, epoch.epoch)


class AtteNTTeacher(pl.Callback):
    """Difficulty-aware data selection over a planned epoch schedule.

    Args:
        selector: What each epoch trains on (default: soft Gumbel-top-k).
        scorer: How scores are measured (default: a full, reproducible forward pass).
        ratio: Subset-ratio schedule over cycles (for selectors that use it).
        interval: Subset-epoch schedule over cycles (for selectors that use it).
        seed: Seeds selection and shuffling; shared by all ranks.
        output_dir: Where ``selection.jsonl`` and ``selection.png`` go (default: the trainer's root dir).
        plot: Write ``selection.png`` at the end of fitting.
    """

    def __init__(
        self,
        *,
        selector: Selector | None = None,
        scorer: Scorer | None = None,
        ratio: RatioSchedule | None = None,
        interval: IntervalSchedule | None = None,
        seed: int = 0,
        output_dir: str | None = None,
        plot: bool = True,
    ) -> None:
        self.selector = selector or SoftSelector()
        self.scorer = scorer or FullPassScorer()
        self.ratio = ratio or RatioSchedule()
        self.interval = interval or IntervalSchedule()
        self.seed = seed
        self.output_dir = Path(output_dir) if output_dir else None
        self.plot = plot

        self.request: PlanRequest | None = None
        self.plan: list[EpochPlan] = []
        self._initial_plan: list[EpochPlan] = []
        self._step_ends: list[int] = []
        self.resolved: dict[int, int] = {}  # estimated epochs fixed so far: epoch -> selected samples
        self.bank: ScoreBank | None = None
        self.sampler: WholeStepSampler | None = None
        self.selection: Selection | None = None
        self.prepared_epoch = -1
        self.last_ended_epoch = -1
        self._resume_step = 0
        self._restored: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self.scoring_time_s = 0.0
        self.selection_time_s = 0.0
        self.scoring_passes = 0

    # ----------------------------------------------------------------------------------------------------------
    # planning

    def make_plan(
        self, *, max_epochs: int, dataset_size: int, batch_size: int, world_size: int, accumulate: int = 1
    ) -> list[EpochPlan]:
        request = PlanRequest(max_epochs, dataset_size, batch_size, world_size, accumulate)
        return self.selector.plan(request, ratio=self.ratio, interval=self.interval)

    def epoch_at_step(self, global_step: int) -> int:
        """The plan epoch that optimizer step ``global_step`` (0-based) belongs to."""
        return min(bisect.bisect_right(self._step_ends, global_step), len(self.plan) - 1)

    def _set_plan(self, plan: list[EpochPlan]) -> None:
        self.plan = plan
        self._step_ends = list(accumulate(p.num_steps for p in plan))

    def _global_step(self, trainer: pl.Trainer) -> int:
        # During on_fit_start of a resumed run the trainer still reports step 0.
        return max(trainer.global_step, self._resume_step)

    # ----------------------------------------------------------------------------------------------------------
    # Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._raise_if(trainer_problems(trainer))
        self._trainer = trainer
        self.scorer.reset()
        self._restored, self._resume_step, self.resolved = None, 0, {}
        datamodule = trainer.datamodule
        dataset_size = len(datamodule.train_dataset())
        accumulate = int(trainer.accumulate_grad_batches)
        self.request = PlanRequest(
            trainer.max_epochs, dataset_size, datamodule.batch_size, trainer.world_size, accumulate
        )
        self._initial_plan = self.selector.plan(self.request, ratio=self.ratio, interval=self.interval)
        self._set_plan(self._initial_plan)
        self._raise_if(self._module_problems(pl_module, datamodule))
        self.bank = ScoreBank(dataset_size)
        # With accumulation, epochs hold whole optimizer steps (the plan counts those); otherwise the loader's
        # drop_last already cuts the shard to whole batches.
        self.sampler = WholeStepSampler(
            dataset_size,
            step_samples=datamodule.batch_size * accumulate if accumulate > 1 else 1,
            seed=self.seed,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
        )
        datamodule.set_train_sampler(self.sampler)
        if isinstance(pl_module, PlannedSchedule):
            pl_module.total_steps = self._step_ends[-1]
            pl_module.steps_per_full_epoch = self.plan[0].num_steps
        totals = plan_totals(self.plan)
        log.info(
            "AtteNT plan: %s selection, %d epochs (%d on subsets), %d steps%s%s, %.1f%% of full-data training",
            self.selector.strategy,
            totals["epochs"],
            totals["subset_epochs"],
            totals["optimizer_steps"],
            f" of {accumulate} accumulated batches" if accumulate > 1 else "",
            " (estimated until their scores are known)" if any(p.estimated for p in self.plan) else "",
            100 * totals["step_fraction"],
        )

    @staticmethod
    def _raise_if(problems: list[str]) -> None:
        if problems:
            raise TeacherSetupError("AtteNT teacher: " + "; ".join(problems))

    def _module_problems(self, module: pl.LightningModule, datamodule: Any) -> list[str]:
        strategy = f"selection={self.selector.strategy}"
        problems = self.scorer.problems(module, datamodule) if self.selector.needs_scores else []
        if self.selector.weights_losses:
            problems += missing(
                module,
                WeightedLossModule,
                owner="the LightningModule",
                purpose=f"for {strategy} (weighted losses)",
            )
        if any(p.estimated for p in self.plan) and isinstance(module, PlannedSchedule):
            problems += missing(
                module,
                ResizableSchedule,
                owner="the LightningModule",
                purpose=f"for {strategy}, whose epochs are sized as their scores become known",
            )
        return problems

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restored = self._restored
        if restored is None:
            self.prepare_epoch(trainer, pl_module, 0)
            return
        self._replay_resizes(pl_module)
        # Lightning restores its loops only after this hook, so the epoch comes from the step count in our state.
        step = self._resume_step = int(restored["global_step"])
        epoch = self.epoch_at_step(step)
        epoch_start = self._step_ends[epoch - 1] if epoch > 0 else 0
        if epoch > 0 and step == epoch_start and restored["last_ended_epoch"] < epoch - 1:
            # Saved after epoch e-1's last step but before its epoch-end hooks: Lightning finishes e-1 first,
            # and our on_train_epoch_end then prepares e exactly as in an uninterrupted run.
            self._apply(pl_module, self.prepared_epoch)
            return
        if restored["prepared_epoch"] == epoch:
            self._apply(pl_module, epoch)  # the checkpoint was taken after this epoch's selection
        else:
            self.prepare_epoch(trainer, pl_module, epoch)
        # Mid-epoch checkpoint: Lightning runs only the remaining batches, so skip the ones already trained: the
        # optimizer steps' batches, and those of an accumulation window the checkpoint was taken inside.
        accumulate = self.request.accumulate
        batches = (step - epoch_start) * accumulate + int(restored.get("window_batches", 0)) % accumulate
        self.sampler.skip_next(batches * trainer.datamodule.batch_size)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.selector.needs_scores and self.scorer.observes_training:
            # Stamped with the global step after the optimizer step this batch counts toward: every batch of an
            # accumulation window gets the same stamp, the one a single batch of their size would get.
            step = trainer.global_step + (1 if _window_batches(trainer) else 0)
            self.scorer.observe(pl_module, outputs, self.bank, step=step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_ended_epoch = trainer.current_epoch
        self._resume_step = 0
        next_epoch = trainer.current_epoch + 1
        if next_epoch < len(self.plan):
            self.prepare_epoch(trainer, pl_module, next_epoch)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plot and self.history:
            self.write_plot(trainer)

    # ----------------------------------------------------------------------------------------------------------
    # one epoch's preparation: score, select, resolve the plan, shard

    def prepare_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        if self.plan[epoch].reselect:
            self.reselect(trainer, pl_module, self.plan[epoch])
        self._apply(pl_module, epoch)

    def reselect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, entry: EpochPlan) -> None:
        start = time.perf_counter()
        scored = self.selector.needs_scores and self.scorer.needs_pass(
            first_of_cycle=first_reselection_of_cycle(self.plan, entry.epoch)
        )
        if scored:
            self.scorer.score(trainer, pl_module, self.bank, step=self._global_step(trainer), seed=self.seed)
            self.scoring_passes += 1
        # Selectors that never score see zeros: only the number of samples matters to them.
        scores = self.bank.filled() if self.selector.needs_scores else torch.zeros(len(self.bank))
        scoring_s = time.perf_counter() - start
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(selection_seed(self.seed, entry))
        selection = self.selector.select(scores, entry, generator=generator, world_size=trainer.world_size)
        selection_s = time.perf_counter() - start
        self._fit_plan(pl_module, entry, selection.indices.numel())
        self.scoring_time_s += scoring_s
        self.selection_time_s += selection_s
        previous, self.selection = (self.selection.indices if self.selection else None), selection
        labels = (
            trainer.datamodule.sample_labels() if isinstance(trainer.datamodule, LabelledDataModule) else None
        )
        event = selection_event(
            epoch=self.plan[entry.epoch],
            selection=selection,
            scores=scores,
            previous=previous,
            labels=labels,
            strategy=self.selector.strategy,
            scoring=self.scorer.mode if self.selector.needs_scores else "none",
            scored=scored,
            global_step=self._global_step(trainer),
            scoring_time_s=round(scoring_s, 4),
            selection_time_s=round(selection_s, 4),
        )
        self.history.append(event)
        self._write_event(trainer, event)

    def _fit_plan(self, pl_module: pl.LightningModule, entry: EpochPlan, selected: int) -> None:
        """Fix an estimated epoch at its selected size (and re-size the module's schedule); check exact ones."""
        if not entry.estimated:
            if selected != entry.num_samples:
                raise RuntimeError(
                    f"{type(self.selector).__name__} selected {selected} samples for epoch {entry.epoch}, but its "
                    f"plan says {entry.num_samples}: a selector must select what it planned"
                )
            return
        self.resolved[entry.epoch] = selected
        self._set_plan(resolve_estimate(self.plan, entry.epoch, selected, self.request))
        self._resize(pl_module, self.plan, entry.epoch)

    def _resize(self, pl_module: pl.LightningModule, plan: list[EpochPlan], epoch: int) -> None:
        if isinstance(pl_module, ResizableSchedule):
            total = sum(p.num_steps for p in plan)
            pl_module.resize_schedule(total, at_step=sum(p.num_steps for p in plan[:epoch]))

    def _replay_resizes(self, pl_module: pl.LightningModule) -> None:
        """Re-size a resumed module's schedule exactly as the uninterrupted run did, in the same order."""
        plan = self._initial_plan
        for epoch in sorted(self.resolved):
            plan = resolve_estimate(plan, epoch, self.resolved[epoch], self.request)
            self._resize(pl_module, plan, epoch)

    def _apply(self, pl_module: pl.LightningModule, epoch: int) -> None:
        entry = self.plan[epoch]
        if entry.kind == "full":
            self.sampler.set_full()
            weights = None
        else:
            self.sampler.set_pool(self.selection.indices)
            weights = self.selection.weights
        self.sampler.set_epoch(epoch)
        if isinstance(pl_module, WeightedLossModule):
            pl_module.set_sample_weights(weights)
        self.prepared_epoch = epoch

    # ----------------------------------------------------------------------------------------------------------
    # observability

    @rank_zero_only
    def _write_event(self, trainer: pl.Trainer, event: dict[str, Any]) -> None:
        write_event(trainer, event, self.output_dir or Path(trainer.default_root_dir))

    @rank_zero_only
    def write_plot(self, trainer: pl.Trainer) -> None:
        from attent_vision.selection.plots import plot_selection

        out_dir = self.output_dir or Path(trainer.default_root_dir)
        plot_selection(self.plan, self.history, out_dir / "selection.png")

    def selection_snapshot(self) -> SelectionSnapshot:
        """The teacher's state for observers (:class:`~attent_vision.selection.contracts.ShowsSelection`)."""
        scores = measured = None
        if self.bank is not None:
            scores = self.bank.scores
            measured = (self.bank.measured_at >= 0) & torch.isfinite(scores)
        pool = frozenset(self.selection.indices.tolist()) if self.selection is not None else frozenset()
        return SelectionSnapshot(
            reselections=len(self.history),
            last_event=self.history[-1] if self.history else {},
            scores=scores,
            measured=measured,
            pool=pool,
        )

    def summary_fields(self) -> dict[str, Any]:
        totals = plan_totals(self.plan) if self.plan else {}
        scoring = self.scorer.summary()
        return {
            "selection": {
                **self.selector.summary(),
                "ratio": {"kind": self.ratio.kind, "initial": self.ratio.initial, "final": self.ratio.final},
                "interval": {
                    "kind": self.interval.kind,
                    "initial": self.interval.initial,
                    "max": self.interval.max,
                },
                "scoring": scoring["mode"],
                "reproducible_scoring": scoring.get("reproducible"),
                "scoring_options": scoring,
            },
            "scoring_time_s": round(self.scoring_time_s, 3),
            "selection_time_s": round(self.selection_time_s, 4),
            "reselections": len(self.history),
            "scoring_passes": self.scoring_passes,
            "planned_sample_fraction": round(totals.get("step_fraction", 1.0), 4),
            "planned_optimizer_steps": totals.get("optimizer_steps"),
        }

    # ----------------------------------------------------------------------------------------------------------
    # checkpoint state

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        selection = self.selection
        return {
            "global_step": trainer.global_step if trainer is not None else 0,
            # Batches into the accumulation window in flight (0 without accumulation or at a window's end).
            "window_batches": _window_batches(trainer),
            "prepared_epoch": self.prepared_epoch,
            "last_ended_epoch": self.last_ended_epoch,
            "subset": None if selection is None else selection.indices.clone(),
            "weights": None if selection is None or selection.weights is None else selection.weights.clone(),
            "resolved": dict(self.resolved),
            "bank": self.bank.state_dict() if self.bank is not None else None,
            "history": list(self.history),
            "scoring_time_s": self.scoring_time_s,
            "selection_time_s": self.selection_time_s,
            "scoring_passes": self.scoring_passes,
            # Selection and shuffling draw from generators seeded by (seed, cycle, epoch), so the seed is all the
            # teacher's own RNG state; the global RNG states make anything else continue exactly.
            "seed": self.seed,
            "rng": capture_rng_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") != self.seed:
            log.warning(
                "teacher: resuming with seed %s, checkpoint used %s", self.seed, state_dict.get("seed")
            )
        self._restored = state_dict
        self.prepared_epoch = state_dict["prepared_epoch"]
        self.last_ended_epoch = state_dict["last_ended_epoch"]
        subset = state_dict["subset"]
        self.selection = None if subset is None else Selection(subset, state_dict.get("weights"))
        self.resolved = {int(e): int(n) for e, n in (state_dict.get("resolved") or {}).items()}
        if self.request is not None:  # setup ran: rebuild the plan as resolved so far
            plan = self._initial_plan
            for epoch in sorted(self.resolved):
                plan = resolve_estimate(plan, epoch, self.resolved[epoch], self.request)
            self._set_plan(plan)
        if state_dict["bank"] is not None and self.bank is not None:
            self.bank.load_state_dict(state_dict["bank"])
        self.history = list(state_dict["history"])
        self.scoring_time_s = state_dict["scoring_time_s"]
        self.selection_time_s = state_dict["selection_time_s"]
        self.scoring_passes = state_dict.get("scoring_passes", 0)
        restore_rng_state(state_dict["rng"])


def _window_batches(trainer: pl.Trainer | None) -> int:
    """Batches trained since the last optimizer step of this epoch: Lightning resumes a checkpoint after its
    processed batches, and a checkpoint taken between the batches of one accumulation window holds some."""
    if trainer is None or trainer.accumulate_grad_batches == 1:
        return 0
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return int(progress.processed) % int(trainer.accumulate_grad_batches)
