"""A small non-MultiMAE LightningModule and DataModule that meet the AtteNT teacher's contract, and a user-defined
selector (what a new strategy takes: one class here plus one YAML file).

Importable (not a test file) so that ``train.py`` can build ``CrashAtStep`` from a Hydra override, and so that the
tests share them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from attent_vision.selection import CycleSelector

if TYPE_CHECKING:
    import pytest  # train.py imports this module (CrashAtStep) and needs no pytest at run time


class NoisyRegression(Dataset):
    """y = <w, x> + noise whose scale grows with the index: high indices are the hard samples."""

    def __init__(self, num_samples: int = 64, dim: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(num_samples, dim, generator=g)
        w = torch.arange(1, dim + 1, dtype=torch.float32)
        noise_scale = torch.linspace(0.0, 3.0, num_samples)
        self.y = self.x @ w + noise_scale * torch.randn(num_samples, generator=g).sign()
        self.labels = (torch.arange(num_samples) * 4 // num_samples).long()

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index], "index": torch.tensor(index, dtype=torch.int64)}


class ToyDataModule(pl.LightningDataModule):
    def __init__(self, num_samples: int = 64, batch_size: int = 4) -> None:
        super().__init__()
        self.dataset = NoisyRegression(num_samples)
        self.batch_size = batch_size
        self.sampler: Sampler[int] | None = None
        self.num_workers = 0

    def train_dataset(self) -> Dataset:
        return self.dataset

    def set_train_sampler(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler

    def sample_labels(self) -> torch.Tensor:
        return self.dataset.labels

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True)


class ToyRegressor(pl.LightningModule):
    """Linear regression reporting a squared error per sample; takes per-sample loss weights (InfoBatch).

    It starts at the true weights, so each sample's loss is its own noise: the difficulty ranking is known.
    """

    def __init__(self, dim: int = 4, lr: float = 1e-4) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        with torch.no_grad():
            self.linear.weight.copy_(torch.arange(1, dim + 1, dtype=torch.float32)[None])
            self.linear.bias.zero_()
        self.lr = lr
        self.sample_weights: torch.Tensor | None = None

    def set_sample_weights(self, weights: torch.Tensor | None) -> None:
        self.sample_weights = weights

    def per_sample_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.linear(batch["x"]).squeeze(-1) - batch["y"]) ** 2

    def training_step(self, batch, batch_idx):
        losses = self.per_sample_loss(batch)
        weights = 1.0 if self.sample_weights is None else self.sample_weights[batch["index"]]
        return {"loss": (weights * losses).mean(), "sample_loss": losses.detach(), "index": batch["index"]}

    @torch.no_grad()
    def score_batch(self, batch, *, seed=None):
        return self.per_sample_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def known_scores(num_samples: int, seed: int = 0) -> torch.Tensor:
    """Distinct, right-skewed scores (exponential draws, like training losses) in an order unrelated to the index."""
    return -torch.log(torch.rand(num_samples, generator=torch.Generator().manual_seed(seed)))


class KnownScoreRegressor(ToyRegressor):
    """ToyRegressor whose scores are a fixed table, from the scoring pass and from training alike.

    A sample's score then depends neither on the weights (which train differently on one process than on two) nor
    on the batch it is in, so one process and two ranks see identical scores and must select identically.

    Args:
        scores: (M,) float32 score of every dataset index.
    """

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.known = scores.clone()

    def training_step(self, batch, batch_idx):
        return {**super().training_step(batch, batch_idx), "sample_loss": self.known[batch["index"]]}

    @torch.no_grad()
    def score_batch(self, batch, *, seed=None):
        return self.known[batch["index"]]


def isolate_master_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gives one in-process DDP fit a free port of its own, unset again when the test ends.

    Lightning's launcher writes ``MASTER_PORT`` into the pytest process's environment; left there, every later fit
    of this worker would reuse the port, and every ``train.py`` it starts would inherit it.
    """
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    monkeypatch.setenv("MASTER_PORT", str(find_free_network_port()))


class ShardRecorder(pl.Callback):
    """Writes, per rank and epoch, the teacher's pool, this rank's shard and the steps actually run."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.records: list[dict] = []
        self._steps = 0

    def on_train_epoch_start(self, trainer, pl_module):
        sampler = trainer.datamodule.sampler
        self._steps = 0
        weights = getattr(pl_module, "sample_weights", None)
        pool = sorted(sampler.pool.tolist())
        self.records.append(
            {
                "epoch": trainer.current_epoch,
                "pool": pool,
                "shard": list(iter(sampler)),
                "len": len(sampler),
                "weights": None if weights is None else weights[pool].tolist(),
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._steps += 1
        self.records[-1]["seen"] = self.records[-1].get("seen", []) + batch["index"].tolist()

    def on_train_epoch_end(self, trainer, pl_module):
        self.records[-1]["steps"] = self._steps

    def on_fit_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.records))


class CrashAtStep(pl.Callback):
    """Raises once training reaches ``step``: stands in for a crash or a pre-emption mid-epoch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


@dataclass(frozen=True, kw_only=True)
class LossProportional(CycleSelector):
    """A user's strategy: k samples without replacement, with probability proportional to their score."""

    strategy: str = "lossprop"

    def choose(self, scores: torch.Tensor, k: int, *, generator: torch.Generator) -> torch.Tensor:
        return torch.multinomial(scores.clamp_min(1e-12), k, replacement=False, generator=generator)


def toy_trainer(root: Path, callbacks: list, *, max_epochs: int = 7, **kwargs) -> pl.Trainer:
    """A CPU Trainer the teacher accepts (its own sampler, loaders re-requested every epoch), with nothing written
    but what the callbacks write under ``root``."""
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        reload_dataloaders_every_n_epochs=1,
        default_root_dir=root,
        callbacks=callbacks,
        **kwargs,
    )
