"""Pictures of a fine-tuning run: prediction galleries and the segmentation confusion matrix.

Files go into the run directory (``predictions/epoch_NNN.png``, ``confusion_matrix.png``) and to the active image
loggers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import numpy as np
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from attent_vision.lightning.pictures.drawing import (
    colorize_depth,
    colorize_labels,
    denormalize_rgb,
    grid_figure,
    log_figure,
)

__all__ = ["PredictionGallery", "plot_confusion_matrix"]

log = logging.getLogger(__name__)


def plot_confusion_matrix(confusion: Tensor, class_names: list[str] | None = None) -> plt.Figure:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction)."""
    counts = confusion.detach().cpu().double()
    rows = counts.sum(1, keepdim=True).clamp_min(1)
    share = (counts / rows).numpy()
    k = share.shape[0]
    names = class_names or [str(i) for i in range(k)]
    size = max(4.0, 0.35 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_xticks(range(k), names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    if k <= 12:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{share[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, fraction=0.046)
    ax.set_title("confusion matrix (row-normalised)")
    fig.tight_layout()
    return fig


class PredictionGallery(pl.Callback):
    """Every ``every_n_epochs`` (and after the last epoch) draws input, prediction and ground truth for the same
    ``num_samples`` evaluation images; for segmentation it also draws the confusion matrix at the end.

    Args:
        output_dir: Run directory; images go to ``predictions/`` and ``confusion_matrix.png``.
        num_samples: Evaluation images shown (the first ones of the split, the same every time).
        every_n_epochs: Drawing period in epochs (0: only at the end).
        class_names: Optional names for the labels (classification captions, confusion-matrix axes).
    """

    def __init__(
        self,
        *,
        output_dir: str,
        num_samples: int = 6,
        every_n_epochs: int = 5,
        class_names: list[str] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.class_names = class_names
        self._batch: dict[str, Tensor] | None = None

    def _samples(self, trainer: pl.Trainer) -> dict[str, Tensor]:
        if self._batch is None:
            self._batch = trainer.datamodule.fixed_val_samples(self.num_samples)
        return self._batch

    def _rows(
        self, pl_module: Any, batch: dict[str, Tensor], prediction: Tensor
    ) -> list[list[tuple[str, np.ndarray]]]:
        rows = []
        names = self.class_names or getattr(pl_module.trainer.datamodule, "class_names", None)
        for i in range(prediction.shape[0]):
            row = [("input rgb", denormalize_rgb(batch["rgb"][i]))]
            if pl_module.task == "cls":
                label, guess = (int(batch["label"][i]), int(prediction[i]))
                if names:
                    label, guess = names[label], names[guess]
                row[0] = (f"gt {label} / pred {guess}", row[0][1])
            elif pl_module.task == "semseg":
                if "depth" in pl_module.inputs:
                    row.append(("input depth", colorize_depth(batch["depth"][i], max_depth=10.0)))
                k, ignore = pl_module.num_classes, pl_module.ignore_index
                row.append(("prediction", colorize_labels(prediction[i], k, ignore)))
                row.append(("ground truth", colorize_labels(batch["semseg"][i], k, ignore)))
            else:
                target = batch["depth"][i]
                valid = (target > 0) & (target <= pl_module.max_depth)
                row.append(("prediction (m)", colorize_depth(prediction[i], max_depth=pl_module.max_depth)))
                row.append(
                    ("ground truth (m)", colorize_depth(target, max_depth=pl_module.max_depth, valid=valid))
                )
            rows.append(row)
        if pl_module.task == "cls":  # one picture per sample: lay them out side by side
            return [[row[0] for row in rows[i : i + 6]] for i in range(0, len(rows), 6)]
        return rows

    @rank_zero_only
    def draw(self, trainer: pl.Trainer, pl_module: Any) -> Path:
        batch = self._samples(trainer)
        device_batch = {k: v.to(pl_module.device) for k, v in batch.items()}
        was_training = pl_module.training
        pl_module.eval()
        prediction = pl_module.predict_batch(device_batch).cpu()
        pl_module.train(was_training)
        epoch = trainer.current_epoch
        fig = grid_figure(self._rows(pl_module, batch, prediction), f"{pl_module.task}: epoch {epoch}")
        path = self.output_dir / "predictions" / f"epoch_{epoch:03d}.png"
        log_figure(trainer, "val/predictions", fig, path, trainer.global_step)
        return path

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        epoch = trainer.current_epoch
        last = epoch + 1 >= (trainer.max_epochs or 0)
        if last or (self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0):
            self.draw(trainer, pl_module)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        confusion = getattr(pl_module, "confusion_matrix", None)
        if confusion is None:
            return
        names = self.class_names or getattr(trainer.datamodule, "class_names", None)
        fig = plot_confusion_matrix(confusion, names)
        log_figure(
            trainer,
            "val/confusion_matrix",
            fig,
            self.output_dir / "confusion_matrix.png",
            trainer.global_step,
        )
