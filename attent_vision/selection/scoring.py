"""Scorers: how the score bank is filled — a forward-only pass over the training set, or online from training.

A scorer is what ``attent_vision/conf/pretrain/scoring/<name>.yaml`` builds. The teacher asks it before a re-selection whether a full
pass is due (:meth:`Scorer.needs_pass`), runs it (:meth:`Scorer.score`), and hands it every training step's
outputs (:meth:`Scorer.observe`). Indices always travel as int64 in their own tensor: a float tensor cannot hold
large indices exactly (bf16 loses them above 256).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset

from attent_vision.selection.contracts import (
    ScorableModule,
    ScoringDataModule,
    SelectableModule,
    StopsLongPasses,
    TeacherSetupError,
    accepts_keyword,
    missing,
)
from attent_vision.selection.score_bank import ScoreBank

log = logging.getLogger(__name__)


def stop_if_requested(trainer: pl.Trainer) -> None:
    """Lets every stop handler among the trainer's callbacks end the run before the next batch of a scoring pass."""
    for callback in trainer.callbacks:
        if isinstance(callback, StopsLongPasses):
            callback.stop_if_requested(trainer)


@dataclass(kw_only=True, eq=False)
class Scorer:
    """Base of the scorers.

    Args:
        mode: Its name in ``selection.jsonl``, ``summary.json`` and the sweep report.
    """

    mode: str

    observes_training: ClassVar[bool] = False
    """True: :meth:`observe` reads every training step's per-sample losses."""

    def problems(self, module: pl.LightningModule, datamodule: Any) -> list[str]:
        """What ``module`` / ``datamodule`` lack for this scorer (empty when nothing)."""
        return []

    def reset(self) -> None:
        """Forget per-fit state (cached loaders) at the start of a fit."""

    def needs_pass(self, *, first_of_cycle: bool) -> bool:
        """Whether a full scoring pass runs before this re-selection."""
        return False

    def score(
        self, trainer: pl.Trainer, module: pl.LightningModule, bank: ScoreBank, *, step: int, seed: int
    ) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no scoring pass")

    def observe(self, module: pl.LightningModule, outputs: Any, bank: ScoreBank, *, step: int) -> None:
        """Reads one training step's outputs."""

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode}


@dataclass(kw_only=True, eq=False)
class OnlineScorer(Scorer):
    """Reuses the per-sample losses of the training steps: no extra pass. Samples outside the current pool keep
    the score of the last time they were trained on."""

    mode: str = "online"
    observes_training: ClassVar[bool] = True

    def observe(self, module: pl.LightningModule, outputs: Any, bank: ScoreBank, *, step: int) -> None:
        if not isinstance(outputs, dict) or "sample_loss" not in outputs or "index" not in outputs:
            raise TeacherSetupError(
                "scoring=online needs training_step to return {'loss', 'sample_loss': (B,), 'index': (B,) int64} "
                "(SelectableModule)"
            )
        indices = outputs["index"].detach()
        if indices.dtype != torch.int64:
            raise TeacherSetupError(f"training_step's 'index' must be int64, got {indices.dtype}")
        losses = outputs["sample_loss"].detach().float()
        indices = module.all_gather(indices).reshape(-1)
        losses = module.all_gather(losses).reshape(-1)
        bank.update(indices, losses, step=step)

    def problems(self, module: pl.LightningModule, datamodule: Any) -> list[str]:
        return missing(
            module,
            SelectableModule,
            owner="the LightningModule",
            purpose="so that scoring=online reads its losses",
        )


@dataclass(kw_only=True, eq=False)
class FullPassScorer(Scorer):
    """A forward-only pass over the training set, sharded across ranks and all-gathered into the bank.

    It runs under the trainer's precision (autocast as in training) with gradients off, and decodes only the
    scored tasks.

    Args:
        refresh: ``every`` re-selection, or ``cycle``: once per cycle (re-draws inside a cycle reuse its scores).
        reproducible: Evaluation transforms and masks seeded by sample index. False gives the reference
            behaviour (training transforms, random masks).
        batch_size: Batch size of the pass (default: 4 x the training batch; no activations are kept).
        num_workers: DataLoader workers of the pass (default: the datamodule's).
        tasks: Output tasks whose losses make the score (None: every task the module scores by default). Tasks
            left out skip their decoder.
        cpu_bf16: bf16 autocast for the pass on CPU; fast only on CPUs with native bf16 (AVX512-BF16, AMX).
    """

    mode: str = "full"
    refresh: Literal["every", "cycle"] = "every"
    reproducible: bool = True
    batch_size: int | None = None
    num_workers: int | None = None
    tasks: Sequence[str] | None = None
    cpu_bf16: bool = False
    _loader: DataLoader | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.refresh not in ("every", "cycle"):
            raise ValueError(f"scoring.refresh: unknown {self.refresh!r}; allowed: every, cycle")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(
                f"scoring.batch_size: {self.batch_size} must be >= 1 (or null for 4 x data.batch_size)"
            )
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"scoring.num_workers: {self.num_workers} must be >= 0 (or null)")
        if self.tasks is not None:
            self.tasks = [str(t) for t in self.tasks]  # Hydra hands over a ListConfig
            if not self.tasks:
                raise ValueError("scoring.tasks: needs at least one task (or null for all)")

    def problems(self, module: pl.LightningModule, datamodule: Any) -> list[str]:
        out = missing(
            module,
            ScorableModule,
            owner="the LightningModule",
            purpose="for scoring=full (or use scoring=online)",
        )
        if not out and self.tasks is not None and not accepts_keyword(module.score_batch, "tasks"):
            out.append(
                "scoring.tasks needs `score_batch(batch, *, seed, tasks: Sequence[str] | None)` on the "
                "LightningModule (or scoring.tasks=null)"
            )
        return out

    def reset(self) -> None:
        self._loader = None

    def needs_pass(self, *, first_of_cycle: bool) -> bool:
        return self.refresh == "every" or first_of_cycle

    def score(
        self, trainer: pl.Trainer, module: pl.LightningModule, bank: ScoreBank, *, step: int, seed: int
    ) -> None:
        self._loader = self._loader or self._build_loader(trainer, seed)
        options: dict[str, Any] = {"seed": seed if self.reproducible else None}
        if self.tasks is not None:
            options["tasks"] = self.tasks
        was_training = module.training
        module.eval()
        indices, scores = [], []
        try:
            with torch.no_grad():
                for batch in self._loader:
                    # A pass over a large set takes minutes, longer than a scheduler's grace time after SIGTERM:
                    # a stop signal ends it after the batch in flight (the resumed run scores anew).
                    stop_if_requested(trainer)
                    batch = module.transfer_batch_to_device(batch, module.device, 0)
                    with self._precision(trainer, module):
                        scores.append(module.score_batch(batch, **options).float())
                    indices.append(batch["index"].to(torch.int64))
        finally:
            module.train(was_training)
        all_indices = module.all_gather(torch.cat(indices)).reshape(-1)
        all_scores = module.all_gather(torch.cat(scores)).reshape(-1)
        bank.update(all_indices, all_scores, step=step)

    @contextlib.contextmanager
    def _precision(self, trainer: pl.Trainer, module: pl.LightningModule) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(trainer.precision_plugin.forward_context())
            if self.cpu_bf16 and module.device.type == "cpu":
                stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            yield

    def _build_loader(self, trainer: pl.Trainer, seed: int) -> DataLoader:
        """This rank's shard of the training set, built once: persistent workers survive between passes."""
        datamodule = trainer.datamodule
        if isinstance(datamodule, ScoringDataModule):
            dataset = datamodule.scoring_dataset(train_transform=not self.reproducible)
        else:
            dataset = datamodule.train_dataset()
        world, rank = trainer.world_size, trainer.global_rank
        shard = torch.arange(rank, len(dataset), world, dtype=torch.int64)
        per_rank = -(-len(dataset) // world)
        if (
            shard.numel() < per_rank
        ):  # equal shard sizes keep all_gather shapes equal; a repeat rewrites a score
            shard = torch.cat([shard, shard[-1:].expand(per_rank - shard.numel())])
        workers = self.num_workers if self.num_workers is not None else getattr(datamodule, "num_workers", 0)
        return DataLoader(
            Subset(dataset, shard.tolist()),
            batch_size=self.batch_size or 4 * datamodule.batch_size,
            shuffle=False,
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(seed),  # a loader without one draws from the global RNG
        )

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "refresh": self.refresh,
            "reproducible": self.reproducible,
            "batch_size": self.batch_size,
            "tasks": self.tasks,
            "cpu_bf16": self.cpu_bf16,
        }
