"""Pictures of a pretraining run: MultiMAE reconstruction grids and the AtteNT teacher's selection galleries.

Two Lightning callbacks (``attent_vision/conf/pretrain/callbacks/default.yaml``):

* :class:`ReconstructionGrid` draws masked input, prediction and target of every input modality for the same few
  validation samples, with the validation masks (``module.val_mask_seeds``): ``reconstructions/epoch_NNN.png``.
* :class:`SelectionGallery` draws the highest- and lowest-scored training images each time the teacher re-selects:
  ``selection_gallery/epoch_NNN.png``.

Both also go to TensorBoard / W&B when those loggers are active, draw on rank 0 only (composed with PIL, ~0.1 s a
picture on a small CPU), and never stop training: a failed drawing is logged as an error with its traceback and
listed in ``summary.json`` (``reconstruction_errors`` / ``selection_gallery_errors``), and training goes on
(``raise_errors=true`` re-raises instead, for tests and debugging). The seconds spent drawing are part of the run's
wall time; ``summary.json`` reports them as ``reconstruction_time_s`` / ``selection_gallery_time_s``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch import Tensor
from torch.utils.data import default_collate

from attent_vision.lightning.pictures.drawing import (
    PictureCallback,
    Tile,
    colorize_labels,
    colorize_values,
    denormalize_rgb,
    log_image,
    mosaic,
)
from attent_vision.selection.contracts import SelectionSnapshot, ShowsSelection

__all__ = [
    "DEPTH_STD_RANGE",
    "ReconstructionGrid",
    "SelectionGallery",
    "grey_out",
    "rank_samples",
    "raw_rgb",
    "token_mask_pixels",
]

log = logging.getLogger(__name__)

MASK_GREY = np.array([128, 128, 128], dtype=np.uint8)
# Standardised depth (per sample, by its central 80 % of values) is drawn on this fixed range, in std units, so
# colours mean the same in every picture and every epoch.
DEPTH_STD_RANGE = (-2.5, 2.5)
THUMBNAIL_PX = 192  # raw training images are shrunk to this before drawing
CELL_PX = 160  # tile side in the pictures
_GREEN = (44, 160, 44)


# ---------------------------------------------------------------------------------------------------------------
# reconstruction grid


def token_mask_pixels(mask: Tensor, size: tuple[int, int]) -> np.ndarray:
    """(N,) token mask (1 = masked) → (H, W) bool pixels; the patch side follows from N and the map size."""
    h, w = size
    n = int(mask.numel())
    scale = round((h * w / n) ** 0.5) if n else 0
    if scale < 1 or (h // scale) * (w // scale) != n or h % scale or w % scale:
        raise ValueError(f"a mask of {n} tokens does not tile a {h}x{w} map with square patches")
    grid = mask.detach().cpu().reshape(h // scale, w // scale).bool().numpy()
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def grey_out(image: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 with masked pixels grey: what the encoder did not see."""
    out = image.copy()
    out[masked] = MASK_GREY
    return out


def _colour_fn(task: str, module: Any, target: Tensor, pred: Tensor | None) -> tuple[Callable, str]:
    """The colouring of one task's maps and its caption suffix."""
    if task == "rgb":
        return denormalize_rgb, ""
    if task == "depth":
        if getattr(module, "standardize_depth", False):
            return (lambda v: colorize_values(v, DEPTH_STD_RANGE)), " (std.)"
        high = float(target.float().amax()) or 1.0  # raw depth: 0 .. this sample's farthest value
        return (lambda v: colorize_values(v, (0.0, high))), ""
    if task == "semseg":
        num_classes = int(pred.shape[0]) if pred is not None else int(target.max()) + 1
        return (lambda v: colorize_labels(v, num_classes)), ""
    raise ValueError(f"no colouring for modality {task!r}")


def reconstruction_rows(
    module: Any,
    targets: Mapping[str, Tensor],
    preds: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
) -> list[list[tuple[str, np.ndarray]]]:
    """One row per sample: for each input modality its masked input, prediction and target.

    Args:
        module: The pretraining module (``in_domains``, ``standardize_depth``).
        targets: Model inputs after ``prepare_inputs`` (CPU), i.e. the reconstruction targets.
        preds: Network outputs (CPU); semseg as logits (B, K, h, w).
        masks: Token masks (B, N_t), 1 = masked.
    """
    batch = next(iter(targets.values())).shape[0]
    rows = []
    for i in range(batch):
        row = []
        for task in module.in_domains:
            target = targets[task][i]
            pred = preds[task][i].float() if task in preds else None
            colour, suffix = _colour_fn(task, module, target, pred)
            target_image = colour(target)
            masked = token_mask_pixels(masks[task][i], target_image.shape[:2])
            row.append((f"{task}{suffix}, {100 * masked.mean():.0f}% masked", grey_out(target_image, masked)))
            if pred is not None:
                shown = pred.argmax(0) if task == "semseg" else pred
                row.append((f"{task}{suffix} prediction", colour(shown)))
            row.append((f"{task}{suffix} target", target_image))
        rows.append(row)
    return rows


def _val_dataset(trainer: pl.Trainer) -> Any:
    dataset = getattr(trainer.datamodule, "val_set", None) if trainer.datamodule is not None else None
    if dataset is None and trainer.val_dataloaders is not None:
        loader = trainer.val_dataloaders
        dataset = (loader[0] if isinstance(loader, Sequence) else loader).dataset
    if dataset is None:
        raise RuntimeError(
            "no validation dataset to take samples from (datamodule.val_set or val_dataloaders)"
        )
    return dataset


class ReconstructionGrid(PictureCallback):
    """Every ``every_n_epochs`` epochs (and after the last one) draws MultiMAE reconstructions of fixed samples.

    For ``num_samples`` validation samples spread evenly over the split (the same ones every time, evaluation
    transforms) and every input modality: the masked input (hidden patches grey), the prediction and the target.
    The masks are the validation masks (seeded by ``index + val_mask_seed``), so pictures of different epochs
    differ only by the model. RGB is de-normalised; depth is the model's target, i.e. standardised per sample when
    ``model.standardize_depth`` (drawn on a fixed ±2.5 std range, near = bright); semseg uses a fixed palette. The
    extra per-patch-normalised ``norm_rgb`` output is not drawn (its colours have no absolute meaning).

    Drawing runs a forward pass on rank 0 only, in eval mode, under a forked RNG: training draws the same random
    numbers with or without it.

    Args:
        output_dir: Run directory; images go to ``reconstructions/epoch_NNN.png``.
        every_n_epochs: Drawing period in epochs (0: only after the last epoch).
        num_samples: Validation samples shown, one row each.
        raise_errors: Re-raise a failed drawing instead of logging it and training on.
    """

    name = "reconstruction"

    def __init__(
        self, *, output_dir: str, every_n_epochs: int = 10, num_samples: int = 4, raise_errors: bool = False
    ) -> None:
        super().__init__(output_dir=output_dir, raise_errors=raise_errors)
        if every_n_epochs < 0 or num_samples < 1:
            raise ValueError(
                f"callbacks.reconstructions: every_n_epochs {every_n_epochs} must be >= 0 and num_samples "
                f"{num_samples} >= 1"
            )
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self._batch: dict[str, Tensor] | None = None

    def samples(self, trainer: pl.Trainer) -> dict[str, Tensor]:
        """The fixed validation samples as one CPU batch (read once)."""
        if self._batch is None:
            dataset = _val_dataset(trainer)
            count = min(self.num_samples, len(dataset))
            indices = np.linspace(0, len(dataset) - 1, count).round().astype(int)
            self._batch = default_collate([dataset[int(i)] for i in indices])
        return self._batch

    @torch.no_grad()
    def reconstruct(
        self, trainer: pl.Trainer, module: Any
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """(targets, predictions, token masks) of the fixed samples, on the CPU."""
        batch = {k: v.to(module.device) for k, v in self.samples(trainer).items()}
        targets = {**batch, **module.prepare_inputs(batch)}
        devices = [module.device] if module.device.type == "cuda" else []
        was_training = module.training
        module.eval()
        try:
            with torch.random.fork_rng(devices=devices), trainer.precision_plugin.forward_context():
                preds, masks = module.net(
                    {task: targets[task] for task in module.in_domains},
                    module.val_mask_seeds(batch["index"]),
                )
        finally:
            module.train(was_training)

        def cpu(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return {
                k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in tensors.items()
            }

        return cpu({t: targets[t] for t in module.in_domains}), cpu(preds), cpu(masks)

    @rank_zero_only
    def draw(self, trainer: pl.Trainer, module: Any) -> Path:
        """Draws the grid of the current epoch and writes/logs it; returns the PNG path."""
        targets, preds, masks = self.reconstruct(trainer, module)
        epoch = trainer.current_epoch
        title = (
            f"MultiMAE reconstructions, epoch {epoch} (validation masks; grey = hidden from the encoder; "
            f"depth standardised: ±{DEPTH_STD_RANGE[1]} std)"
            if getattr(module, "standardize_depth", False)
            else f"MultiMAE reconstructions, epoch {epoch} (validation masks; grey = hidden from the encoder)"
        )
        indices = self.samples(trainer)["index"].tolist()
        rows = [
            (f"validation sample #{index}", [Tile(image, caption) for caption, image in row])
            for index, row in zip(indices, reconstruction_rows(module, targets, preds, masks), strict=True)
        ]
        path = self.output_dir / "reconstructions" / f"epoch_{epoch:03d}.png"
        log_image(
            trainer, "pretrain/reconstructions", mosaic(rows, title, cell=CELL_PX), path, trainer.global_step
        )
        return path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After validation, before the teacher (run.py puts it last) scores for the next epoch.
        epoch = trainer.current_epoch
        last = epoch + 1 >= (trainer.max_epochs or 0)
        if last or (self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0):
            self._guarded(f"reconstruction grid of epoch {epoch}", lambda: self.draw(trainer, pl_module))


# ---------------------------------------------------------------------------------------------------------------
# selection gallery


def rank_samples(scores: Tensor, measured: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Indices of the ``n`` highest (descending) and ``n`` lowest (ascending) measured scores."""
    candidates = measured.nonzero().reshape(-1)
    order = candidates[scores[candidates].argsort(descending=True, stable=True)]
    n = min(n, order.numel())
    return order[:n], order[order.numel() - n :].flip(0)


def raw_rgb(dataset: Any, index: int, max_side: int = THUMBNAIL_PX) -> np.ndarray:
    """Sample ``index``'s RGB as stored (no augmentation), shrunk to ``max_side``: (H, W, 3) uint8."""
    image: Any = None
    if hasattr(dataset, "load"):
        image = dataset.load(index).get("rgb")
    elif hasattr(dataset, "sample_paths"):
        with Image.open(dataset.sample_paths(index)["rgb"]) as opened:
            image = opened.convert("RGB")
    if image is None:  # a plain dataset: its (transformed) item is all there is
        return denormalize_rgb(dataset[index]["rgb"])
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB")
    image.thumbnail((max_side, max_side))
    return np.asarray(image)


class SelectionGallery(PictureCallback):
    """At every re-selection of the AtteNT teacher, draws its highest- and lowest-scored training images.

    At each training epoch start (the teacher, last in the callback list, has prepared the epoch by then) this
    callback asks the teacher for its :class:`~attent_vision.selection.contracts.SelectionSnapshot` and draws when
    the number of re-selections grew. Never-measured samples are left out; images are the raw files of the training
    set (``train_dataset().load(index)``), not augmented. Samples in the new pool have a green frame.

    Args:
        output_dir: Run directory; images go to ``selection_gallery/epoch_NNN.png`` (the re-selection's epoch).
        num_images: Images in each of the two rows (highest and lowest scores).
        raise_errors: Re-raise a failed drawing instead of logging it and training on.
    """

    name = "selection_gallery"

    def __init__(self, *, output_dir: str, num_images: int = 8, raise_errors: bool = False) -> None:
        super().__init__(output_dir=output_dir, raise_errors=raise_errors)
        if num_images < 1:
            raise ValueError(f"callbacks.selection_gallery.num_images: {num_images} must be >= 1")
        self.num_images = num_images
        self._seen = 0
        self._warned = False

    def _teacher(self, trainer: pl.Trainer) -> ShowsSelection | None:
        teacher = next((cb for cb in trainer.callbacks if isinstance(cb, ShowsSelection)), None)
        if teacher is None and not self._warned:
            self._warned = True
            log.warning(
                "selection gallery: no AtteNT teacher among the callbacks; no galleries will be drawn"
            )
        return teacher

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run restored the teacher's history before this hook: its galleries exist already.
        teacher = self._teacher(trainer)
        self._seen = teacher.selection_snapshot().reselections if teacher is not None else 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        teacher = self._teacher(trainer)
        snapshot = teacher.selection_snapshot() if teacher is not None else None
        if snapshot is None or snapshot.reselections <= self._seen:
            return
        self._seen = snapshot.reselections
        epoch = int(snapshot.last_event.get("epoch", trainer.current_epoch))
        self._guarded(f"selection gallery of epoch {epoch}", lambda: self.draw(trainer, snapshot, epoch))

    @rank_zero_only
    def draw(self, trainer: pl.Trainer, snapshot: SelectionSnapshot, epoch: int) -> Path | None:
        """Draws the gallery of the teacher's latest re-selection; None when nothing was scored."""
        if snapshot.scores is None or not snapshot.measured.any():  # e.g. random selection: nothing is scored
            log.info(
                "selection gallery: no sample scored for the re-selection of epoch %d; none drawn", epoch
            )
            return None
        scores, measured = snapshot.scores.detach().float().cpu(), snapshot.measured.cpu()
        dataset = trainer.datamodule.train_dataset()
        if len(dataset) != scores.numel():
            raise ValueError(f"the score bank holds {scores.numel()} scores, the training set {len(dataset)}")
        top, bottom = rank_samples(scores, measured, self.num_images)
        chosen = snapshot.pool

        def tiles(indices: Tensor) -> list[Tile]:
            return [
                Tile(
                    raw_rgb(dataset, int(i)),
                    f"#{int(i)}  score {float(scores[i]):.4g}",
                    _GREEN if int(i) in chosen else None,
                )
                for i in indices
            ]

        rows = [("highest scores (hardest)", tiles(top)), ("lowest scores (easiest)", tiles(bottom))]
        event = snapshot.last_event
        title = (
            f"AtteNT re-selection for epoch {epoch} (cycle {event.get('cycle', '?')}, "
            f"{event.get('strategy', '?')}): {int(measured.sum())} scored, k = {event.get('k', len(chosen))} "
            "selected (green frame and caption)"
        )
        path = self.output_dir / "selection_gallery" / f"epoch_{epoch:03d}.png"
        log_image(
            trainer, "teacher/selection_gallery", mosaic(rows, title, cell=CELL_PX), path, trainer.global_step
        )
        return path
