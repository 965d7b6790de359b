"""The AtteNT teacher as a Lightning callback: scores samples, selects subsets, and drives the epoch sampler.

Model-agnostic contract (nothing here imports the project's models, tasks or data):

* the LightningModule's ``training_step`` returns ``{"loss", "sample_loss": (B,) float, "index": (B,) int64}``;
* for ``scoring="full"`` it has ``score_batch(batch, *, seed: int | None) -> (B,)``, a forward-only per-sample loss
  (with ``seed`` set, any randomness it draws for sample i comes from ``seed + index[i]``);
* it may have ``total_steps`` / ``steps_per_full_epoch`` attributes, which receive the plan's exact step counts
  so its LR schedule spans the real run;
* the LightningDataModule has ``batch_size``, ``train_dataset()``, ``set_train_sampler(sampler)`` (its train
  loader must use that sampler), and optionally ``scoring_dataset(train_transform=...)`` (deterministic
  transforms for scoring) and ``sample_labels()`` (int64 class per sample, for the logs).
"""

from __future__ import annotations

import bisect
import json
import logging
import random
import time
from itertools import accumulate
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from attent_vision.selection.plan import EpochPlan, build_plan, plan_totals
from attent_vision.selection.sampler import SubsetSampler
from attent_vision.selection.schedules import IntervalSchedule, RatioSchedule
from attent_vision.selection.score_bank import ScoreBank
from attent_vision.selection.strategies import select

log = logging.getLogger(__name__)


class TeacherSetupError(RuntimeError):
    """The trainer, module or datamodule does not meet the teacher's contract; the message says what to change."""


def _selection_seed(seed: int, cycle: int, epoch: int) -> int:
    # Every rank derives the same generator from (seed, cycle, epoch); the rank never enters.
    return ((seed * 1_000_003 + cycle) * 10_007 + epoch) % (2**63 - 1)


class AtteNTTeacher(pl.Callback):
    """Difficulty-aware subset selection over a planned epoch schedule.

    Args:
        strategy: ``none`` (full data, the baseline), ``random``, ``hard`` (top-k) or ``soft`` (Gumbel-top-k).
        ratio: Subset-ratio schedule over cycles.
        interval: Subset-epoch schedule over cycles.
        total_cycles: Number of select-then-train cycles.
        temperature: Soft selection temperature (applied to the log-weights before the Gumbel noise).
        normalization: Soft selection weights: ``softmax`` or ``sigmoid`` of the scores.
        scoring: ``full`` (a forward-only pass over the training set at each re-selection) or ``online``
            (reuse the per-sample losses of training steps; no extra pass).
        reproducible_scoring: Full scoring with evaluation transforms and masks seeded by sample index. False
            gives the reference behaviour (training transforms, random masks).
        scoring_batch_size: Batch size of the scoring pass (default: twice the training batch; no gradients).
        scoring_num_workers: DataLoader workers of the scoring pass (default: the datamodule's).
        reselect_every_subset_epoch: Re-draw before every subset epoch of a cycle (default: only for soft).
        seed: Seeds selection and shuffling; shared by all ranks.
        output_dir: Where ``selection.jsonl`` and ``selection.png`` go (default: the trainer's root dir).
        plot: Write ``selection.png`` at the end of fitting.
    """

    def __init__(
        self,
        *,
        strategy: str = "soft",
        ratio: RatioSchedule | None = None,
        interval: IntervalSchedule | None = None,
        total_cycles: int = 10,
        temperature: float = 1.0,
        normalization: Literal["softmax", "sigmoid"] = "softmax",
        scoring: Literal["full", "online"] = "full",
        reproducible_scoring: bool = True,
        scoring_batch_size: int | None = None,
        scoring_num_workers: int | None = None,
        reselect_every_subset_epoch: bool | None = None,
        seed: int = 0,
        output_dir: str | None = None,
        plot: bool = True,
    ) -> None:
        if scoring not in ("full", "online"):
            raise ValueError(f"scoring.mode: unknown {scoring!r}; allowed: full, online")
        if temperature <= 0:
            raise ValueError(f"selection.temperature: {temperature} must be > 0")
        if scoring_batch_size is not None and scoring_batch_size < 1:
            raise ValueError(
                f"scoring.batch_size: {scoring_batch_size} must be >= 1 (or null for 2 x data.batch_size)"
            )
        if scoring_num_workers is not None and scoring_num_workers < 0:
            raise ValueError(f"scoring.num_workers: {scoring_num_workers} must be >= 0 (or null)")
        if normalization not in ("softmax", "sigmoid"):
            raise ValueError(f"selection.normalization: unknown {normalization!r}; allowed: softmax, sigmoid")
        self.strategy = strategy
        self.ratio = ratio or RatioSchedule()
        self.interval = interval or IntervalSchedule()
        self.total_cycles = total_cycles
        self.temperature = temperature
        self.normalization = normalization
        self.scoring = scoring
        self.reproducible_scoring = reproducible_scoring
        self.scoring_batch_size = scoring_batch_size
        self.scoring_num_workers = scoring_num_workers
        self.reselect_every_subset_epoch = reselect_every_subset_epoch
        self.seed = seed
        self.output_dir = Path(output_dir) if output_dir else None
        self.plot = plot

        self.plan: list[EpochPlan] = []
        self._step_ends: list[int] = []
        self.bank: ScoreBank | None = None
        self.sampler: SubsetSampler | None = None
        self.subset: Tensor | None = None
        self.prepared_epoch = -1
        self.last_ended_epoch = -1
        self._resume_step = 0
        self.history: list[dict[str, Any]] = []
        self.scoring_time_s = 0.0
        self.selection_time_s = 0.0
        self._restored: dict[str, Any] | None = None
        self._scoring_loader: DataLoader | None = None

    # ----------------------------------------------------------------------------------------------------------
    # planning

    def make_plan(
        self, *, max_epochs: int, dataset_size: int, batch_size: int, world_size: int
    ) -> list[EpochPlan]:
        return build_plan(
            max_epochs=max_epochs,
            dataset_size=dataset_size,
            batch_size=batch_size,
            world_size=world_size,
            strategy=self.strategy,
            ratio=self.ratio,
            interval=self.interval,
            total_cycles=self.total_cycles,
            reselect_every_subset_epoch=self.reselect_every_subset_epoch,
        )

    def _global_step(self, trainer: pl.Trainer) -> int:
        # During on_fit_start of a resumed run the trainer still reports step 0.
        return max(trainer.global_step, self._resume_step)

    def epoch_at_step(self, global_step: int) -> int:
        """The plan epoch that optimizer step ``global_step`` (0-based) belongs to."""
        return min(bisect.bisect_right(self._step_ends, global_step), len(self.plan) - 1)

    # ----------------------------------------------------------------------------------------------------------
    # Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_contract(trainer, pl_module)
        self._trainer = trainer
        self._scoring_loader = None
        self._restored = None  # load_state_dict (called after setup when resuming) fills it
        self._resume_step = 0
        datamodule = trainer.datamodule
        dataset_size = len(datamodule.train_dataset())
        self.plan = self.make_plan(
            max_epochs=trainer.max_epochs,
            dataset_size=dataset_size,
            batch_size=datamodule.batch_size,
            world_size=trainer.world_size,
        )
        self._step_ends = list(accumulate(p.num_steps for p in self.plan))
        self.bank = ScoreBank(dataset_size)
        self.sampler = SubsetSampler(
            dataset_size, seed=self.seed, num_replicas=trainer.world_size, rank=trainer.global_rank
        )
        datamodule.set_train_sampler(self.sampler)
        if hasattr(pl_module, "total_steps"):
            pl_module.total_steps = self._step_ends[-1]
            pl_module.steps_per_full_epoch = self.plan[0].num_steps
        totals = plan_totals(self.plan)
        log.info(
            "AtteNT plan: %s selection, %d epochs (%d on subsets), %d steps, %.1f%% of full-data training",
            self.strategy,
            totals["epochs"],
            totals["subset_epochs"],
            totals["optimizer_steps"],
            100 * totals["step_fraction"],
        )

    def _check_contract(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        problems = []
        if trainer._accelerator_connector.use_distributed_sampler:
            problems.append(
                "trainer.use_distributed_sampler must be false (Lightning would re-pad the subset)"
            )
        if trainer.reload_dataloaders_every_n_epochs != 1:
            problems.append("trainer.reload_dataloaders_every_n_epochs must be 1 (epoch lengths change)")
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            problems.append("trainer.max_epochs must be set: the plan is built from it")
        # The plan counts one optimizer step per batch over whole epochs; these settings would break that.
        if trainer.accumulate_grad_batches != 1:
            problems.append("trainer.accumulate_grad_batches must be 1 (raise data.batch_size instead)")
        if trainer.limit_train_batches not in (1.0, None) or trainer.overfit_batches:
            problems.append(
                "trainer.limit_train_batches / overfit_batches cannot be combined with the teacher"
            )
        if trainer.max_steps not in (-1, None):
            problems.append("trainer.max_steps must be -1: the run length is trainer.max_epochs")
        if trainer.val_check_interval != 1.0:
            problems.append("trainer.val_check_interval must be 1.0 (validate at epoch ends)")
        if trainer.strategy.restore_checkpoint_after_setup:
            problems.append(
                f"strategy {type(trainer.strategy).__name__} restores checkpoints after setup, "
                "after the teacher has prepared its first epoch"
            )
        datamodule = trainer.datamodule
        for name in ("batch_size", "train_dataset", "set_train_sampler"):
            if datamodule is None or not hasattr(datamodule, name):
                problems.append(f"the datamodule needs `{name}`")
        if (
            self.scoring == "full"
            and self.strategy not in ("none", "random")
            and not hasattr(pl_module, "score_batch")
        ):
            problems.append(
                "scoring=full needs `score_batch(batch, *, seed)` on the LightningModule (or use scoring=online)"
            )
        if problems:
            raise TeacherSetupError("AtteNT teacher: " + "; ".join(problems))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restored = self._restored
        if restored is None:
            self.prepare_epoch(trainer, pl_module, 0)
            return
        # Lightning restores its loops only after this hook, so the epoch comes from the step count in our state.
        step = self._resume_step = int(restored["global_step"])
        epoch = self.epoch_at_step(step)
        epoch_start = self._step_ends[epoch - 1] if epoch > 0 else 0
        if epoch > 0 and step == epoch_start and restored["last_ended_epoch"] < epoch - 1:
            # Saved after epoch e-1's last step but before its epoch-end hooks: Lightning finishes e-1 first,
            # and our on_train_epoch_end then prepares e exactly as in an uninterrupted run.
            self._apply_pool(self.prepared_epoch)
            return
        if restored["prepared_epoch"] == epoch:
            self._apply_pool(epoch)  # the checkpoint was taken after this epoch's selection
        else:
            self.prepare_epoch(trainer, pl_module, epoch)
        # Mid-epoch checkpoint: Lightning runs only the remaining batches, so skip the ones already trained.
        self.sampler.skip_next((step - epoch_start) * trainer.datamodule.batch_size)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.scoring != "online" or self.strategy in ("none", "random"):
            return
        if not isinstance(outputs, dict) or "sample_loss" not in outputs or "index" not in outputs:
            raise TeacherSetupError(
                "scoring=online needs training_step to return {'loss', 'sample_loss': (B,), 'index': (B,) int64}"
            )
        indices = outputs["index"].detach()
        if indices.dtype != torch.int64:
            raise TeacherSetupError(f"training_step's 'index' must be int64, got {indices.dtype}")
        losses = outputs["sample_loss"].detach().float()
        # Indices and losses travel in separate tensors: a float tensor cannot hold large indices exactly.
        indices = pl_module.all_gather(indices).reshape(-1)
        losses = pl_module.all_gather(losses).reshape(-1)
        self.bank.update(indices, losses, step=trainer.global_step)

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
    # one epoch's preparation: score, select, shard

    def prepare_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        step = self.plan[epoch]
        if step.reselect:
            self.reselect(trainer, pl_module, step)
        self._apply_pool(epoch)
        self.prepared_epoch = epoch

    def _apply_pool(self, epoch: int) -> None:
        step = self.plan[epoch]
        if step.kind == "full":
            self.sampler.set_full()
        else:
            self.sampler.set_pool(self.subset)
        self.sampler.set_epoch(epoch)
        self.prepared_epoch = epoch

    def reselect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: EpochPlan) -> None:
        start = time.perf_counter()
        if self.strategy == "random":
            scores = torch.zeros(len(self.bank))  # scores are not needed: nothing is scored (unlike A10)
        elif self.scoring == "full":
            self.score_all(trainer, pl_module)
            scores = self.bank.filled()
        else:
            scores = self.bank.filled()
        scoring_s = time.perf_counter() - start
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(_selection_seed(self.seed, step.cycle, step.epoch))
        chosen = select(
            self.strategy,
            scores,
            step.num_samples,
            generator=generator,
            temperature=self.temperature,
            normalization=self.normalization,
        )
        selection_s = time.perf_counter() - start
        self.scoring_time_s += scoring_s
        self.selection_time_s += selection_s
        previous, self.subset = self.subset, chosen
        self.record(trainer, step, scores, chosen, previous, scoring_s, selection_s)

    @torch.no_grad()
    def score_all(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Forward-only pass over the training set, sharded across ranks and all-gathered into the bank."""
        loader = self._scoring_loader or self._build_scoring_loader(trainer)
        self._scoring_loader = loader
        seed = self.seed * 7919 + 17 if self.reproducible_scoring else None
        was_training = pl_module.training
        pl_module.eval()
        indices, scores = [], []
        try:
            for batch in loader:
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                with trainer.precision_plugin.forward_context():
                    scores.append(pl_module.score_batch(batch, seed=seed).float())
                indices.append(batch["index"].to(torch.int64))
        finally:
            pl_module.train(was_training)
        local_indices, local_scores = torch.cat(indices), torch.cat(scores)
        all_indices = pl_module.all_gather(local_indices).reshape(-1)
        all_scores = pl_module.all_gather(local_scores).reshape(-1)
        self.bank.update(all_indices, all_scores, step=self._global_step(trainer))

    def _build_scoring_loader(self, trainer: pl.Trainer) -> DataLoader:
        """This rank's shard of the training set, built once: persistent workers survive between passes."""
        datamodule = trainer.datamodule
        if hasattr(datamodule, "scoring_dataset"):
            dataset = datamodule.scoring_dataset(train_transform=not self.reproducible_scoring)
        else:
            dataset = datamodule.train_dataset()
        world, rank = trainer.world_size, trainer.global_rank
        shard = torch.arange(rank, len(dataset), world, dtype=torch.int64)
        per_rank = -(-len(dataset) // world)
        if (
            shard.numel() < per_rank
        ):  # equal shard sizes keep all_gather shapes equal; a repeat rewrites one score
            shard = torch.cat([shard, shard[-1:].expand(per_rank - shard.numel())])
        batch_size = self.scoring_batch_size or 2 * datamodule.batch_size
        workers = self.scoring_num_workers
        if workers is None:
            workers = getattr(datamodule, "num_workers", 0)
        return DataLoader(
            Subset(dataset, shard.tolist()),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(self.seed),  # keeps the global RNG untouched
        )

    # ----------------------------------------------------------------------------------------------------------
    # observability

    def record(
        self,
        trainer: pl.Trainer,
        step: EpochPlan,
        scores: Tensor,
        chosen: Tensor,
        previous: Tensor | None,
        scoring_s: float,
        selection_s: float,
    ) -> None:
        ordered = scores.double().sort().values  # torch.quantile refuses more than 2^24 values
        last = ordered.numel() - 1
        quantiles = [ordered[round(q * last)] for q in (0.0, 0.25, 0.5, 0.75, 1.0)]
        overlap = None
        if previous is not None:
            overlap = float(torch.isin(previous, chosen).float().mean())
        event = {
            "epoch": step.epoch,
            "cycle": step.cycle,
            "ratio": round(step.ratio, 6),
            "k": int(chosen.numel()),
            "strategy": self.strategy,
            "scoring": self.scoring if self.strategy != "random" else "none",
            "global_step": self._global_step(trainer),
            "scoring_time_s": round(scoring_s, 4),
            "selection_time_s": round(selection_s, 4),
            "score_min": float(quantiles[0]),
            "score_q25": float(quantiles[1]),
            "score_median": float(quantiles[2]),
            "score_q75": float(quantiles[3]),
            "score_max": float(quantiles[4]),
            "selected_score_mean": float(scores[chosen].mean()),
            "all_score_mean": float(scores.mean()),
            "overlap_with_previous": overlap,
            "class_histogram": self._class_histogram(trainer, chosen),
        }
        self.history.append(event)
        self._write_event(trainer, event)

    def _class_histogram(self, trainer: pl.Trainer, chosen: Tensor) -> dict[str, int] | None:
        labels_fn = getattr(trainer.datamodule, "sample_labels", None)
        labels = labels_fn() if labels_fn is not None else None
        if labels is None:
            return None
        counts = torch.bincount(labels[chosen])
        return {str(c): int(n) for c, n in enumerate(counts.tolist()) if n}

    @rank_zero_only
    def _write_event(self, trainer: pl.Trainer, event: dict[str, Any]) -> None:
        out_dir = self.output_dir or Path(trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "selection.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")
        metrics = {
            f"teacher/{k}": float(v)
            for k, v in event.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "global_step")
        }
        if event["class_histogram"]:
            k = event["k"]
            metrics.update({f"teacher/class_{c}": n / k for c, n in event["class_histogram"].items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=event["global_step"])
        log.info(
            "teacher: epoch %d cycle %s ratio %.3f k %d, scoring %.2fs, scores %.3g/%.3g/%.3g, overlap %s",
            event["epoch"],
            event["cycle"],
            event["ratio"],
            event["k"],
            event["scoring_time_s"],
            event["score_min"],
            event["score_median"],
            event["score_max"],
            "-" if event["overlap_with_previous"] is None else f"{event['overlap_with_previous']:.2f}",
        )

    @rank_zero_only
    def write_plot(self, trainer: pl.Trainer) -> None:
        from attent_vision.selection.plots import plot_selection

        out_dir = self.output_dir or Path(trainer.default_root_dir)
        plot_selection(self.plan, self.history, out_dir / "selection.png")

    def summary_fields(self) -> dict[str, Any]:
        totals = plan_totals(self.plan) if self.plan else {}
        return {
            "selection": {
                "strategy": self.strategy,
                "ratio": {"kind": self.ratio.kind, "initial": self.ratio.initial, "final": self.ratio.final},
                "interval": {
                    "kind": self.interval.kind,
                    "initial": self.interval.initial,
                    "max": self.interval.max,
                },
                "total_cycles": self.total_cycles,
                "temperature": self.temperature,
                "normalization": self.normalization,
                "scoring": self.scoring,
                "reproducible_scoring": self.reproducible_scoring,
            },
            "scoring_time_s": round(self.scoring_time_s, 3),
            "selection_time_s": round(self.selection_time_s, 4),
            "reselections": len(self.history),
            "planned_sample_fraction": round(totals.get("step_fraction", 1.0), 4),
            "planned_optimizer_steps": totals.get("optimizer_steps"),
        }

    # ----------------------------------------------------------------------------------------------------------
    # checkpoint state

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        return {
            "global_step": trainer.global_step if trainer is not None else 0,
            "prepared_epoch": self.prepared_epoch,
            "last_ended_epoch": self.last_ended_epoch,
            "subset": None if self.subset is None else self.subset.clone(),
            "bank": self.bank.state_dict() if self.bank is not None else None,
            "history": list(self.history),
            "scoring_time_s": self.scoring_time_s,
            "selection_time_s": self.selection_time_s,
            # Selection and shuffling draw from generators seeded by (seed, cycle, epoch), so the seed is all the
            # teacher's own RNG state; the global RNG states make augmentation and masks continue exactly.
            "seed": self.seed,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": _numpy_state_to_tensors(np.random.get_state()),
                "python": random.getstate(),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") != self.seed:
            log.warning(
                "teacher: resuming with seed %s, checkpoint used %s", self.seed, state_dict.get("seed")
            )
        self._restored = state_dict
        self.prepared_epoch = state_dict["prepared_epoch"]
        self.last_ended_epoch = state_dict["last_ended_epoch"]
        self.subset = state_dict["subset"]
        if state_dict["bank"] is not None and self.bank is not None:
            self.bank.load_state_dict(state_dict["bank"])
        self.history = list(state_dict["history"])
        self.scoring_time_s = state_dict["scoring_time_s"]
        self.selection_time_s = state_dict["selection_time_s"]
        rng = state_dict["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(_numpy_state_from_tensors(rng["numpy"]))
        random.setstate(rng["python"])


def _numpy_state_to_tensors(state: tuple) -> dict[str, Any]:
    # Plain tensors and numbers load with torch.load(weights_only=True); numpy arrays would not.
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _numpy_state_from_tensors(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]
