"""Pictures of a pretraining run: MultiMAE reconstruction grids and the AtteNT teacher's selection galleries.

Two Lightning callbacks (``conf/callbacks/default.yaml``):

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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torch.utils.data import default_collate

from attent_vision.lightning.visualize import colorize_labels, denormalize_rgb, log_image

__all__ = [
    "DEPTH_STD_RANGE",
    "ReconstructionGrid",
    "SelectionGallery",
    "Tile",
    "colorize_values",
    "find_teacher",
    "grey_out",
    "mosaic",
    "rank_samples",
    "raw_rgb",
    "teacher_scores",
    "teacher_subset",
    "token_mask_pixels",
]

log = logging.getLogger(__name__)

MASK_GREY = np.array([128, 128, 128], dtype=np.uint8)
# Standardised depth (per sample, by its central 80 % of values) is drawn on this fixed range, in std units, so
# colours mean the same in every picture and every epoch.
DEPTH_STD_RANGE = (-2.5, 2.5)
DEPTH_CMAP = "magma_r"  # near = bright, as in the fine-tuning galleries (visualize.colorize_depth)
THUMBNAIL_PX = 192  # raw training images are shrunk to this before drawing
CELL_PX = 160  # tile side in the pictures


# ---------------------------------------------------------------------------------------------------------------
# shared plumbing


class _PictureCallback(pl.Callback):
    """Run-directory output, error policy and drawing-time bookkeeping shared by the picture callbacks.

    ``summary_fields`` (collected by PretrainSummary into ``summary.json``) reports ``<name>_time_s``, the seconds spent
    drawing (they are part of the run's wall time), and ``<name>_errors`` when a drawing failed.
    """

    name = "picture"

    def __init__(self, *, output_dir: str, raise_errors: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.raise_errors = raise_errors
        self.errors: list[str] = []
        self.time_s = 0.0

    def _guarded(self, what: str, draw: Callable[[], Any]) -> None:
        # A picture is never worth a training run; but a failure is reported loudly, never swallowed.
        start = time.perf_counter()
        try:
            draw()
        except Exception as exc:
            if self.raise_errors:
                raise
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")
            log.error("%s failed; training continues without it: %s", what, exc, exc_info=True)
        finally:
            self.time_s += time.perf_counter() - start

    def summary_fields(self) -> dict[str, Any]:
        """Drawing time and failed drawings, for ``summary.json``."""
        fields: dict[str, Any] = {f"{self.name}_time_s": round(self.time_s, 3)}
        if self.errors:
            fields[f"{self.name}_errors"] = list(self.errors)
        return fields


@dataclass
class Tile:
    """One picture of a mosaic: the image, its caption, and an optional frame colour."""

    image: np.ndarray
    caption: str
    frame: tuple[int, int, int] | None = None


_PAD, _GAP, _CAPTION, _HEADING = 10, 8, 17, 20
_WHITE, _BLACK, _GREEN = (255, 255, 255), (20, 20, 20), (44, 160, 44)


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Matplotlib's DejaVu Sans: the same face as the run's other plots, and always installed with it.
    try:
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), size)
    except OSError:
        return ImageFont.load_default(size=size)


def _fit_text(text: str, font: Any, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _wrap(text: str, font: Any, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def mosaic(rows: Sequence[tuple[str, Sequence[Tile]]], title: str, *, cell: int = 160) -> np.ndarray:
    """Rows of captioned tiles on one white canvas, drawn with PIL: (H, W, 3) uint8.

    Each image is scaled to fit a ``cell``-pixel square (nearest-neighbour when enlarging, so patches stay
    sharp). A matplotlib figure with one axes per tile costs ~1 s per picture on a small CPU; this costs ~50 ms.

    Args:
        rows: (heading, tiles) per row; an empty heading takes no space.
        title: Wrapped over the canvas width at the top.
        cell: Side of each tile's square, in pixels.
    """
    num_cols = max(1, max(len(tiles) for _, tiles in rows))
    width = 2 * _PAD + num_cols * cell + (num_cols - 1) * _GAP
    title_font, caption_font, heading_font = _font(14), _font(11), _font(12)
    title_lines = _wrap(title, title_font, width - 2 * _PAD)
    top = _PAD + 18 * len(title_lines) + _GAP
    heights = [(_HEADING if heading else 0) + _CAPTION + cell for heading, _ in rows]
    canvas = Image.new("RGB", (width, top + sum(heights) + _GAP * (len(rows) - 1) + _PAD), _WHITE)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((_PAD, _PAD + 18 * i), line, fill=_BLACK, font=title_font)
    y = top
    for (heading, tiles), height in zip(rows, heights, strict=True):
        if heading:
            draw.text((_PAD, y + 2), heading, fill=_BLACK, font=heading_font)
            y += _HEADING
        for c, tile in enumerate(tiles):
            x = _PAD + c * (cell + _GAP)
            colour = tile.frame or _BLACK
            draw.text((x, y + 2), _fit_text(tile.caption, caption_font, cell), fill=colour, font=caption_font)
            image = Image.fromarray(np.ascontiguousarray(tile.image))
            scale = min(cell / image.width, cell / image.height)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX)
            left, upper = x + (cell - size[0]) // 2, y + _CAPTION + (cell - size[1]) // 2
            canvas.paste(image, (left, upper))
            if tile.frame:
                draw.rectangle(
                    (left - 3, upper - 3, left + size[0] + 2, upper + size[1] + 2),
                    outline=tile.frame,
                    width=3,
                )
        y += height - (_HEADING if heading else 0) + _GAP
    return np.asarray(canvas)


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


def colorize_values(values: Tensor, value_range: tuple[float, float], cmap: str = DEPTH_CMAP) -> np.ndarray:
    """(1, H, W) or (H, W) values → (H, W, 3) uint8 on a fixed range (values outside are clipped)."""
    array = values.detach().float().cpu().reshape(values.shape[-2:]).numpy()
    low, high = value_range
    rgba = plt.get_cmap(cmap)(np.clip((array - low) / max(high - low, 1e-12), 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


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


class ReconstructionGrid(_PictureCallback):
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


def find_teacher(callbacks: Sequence[Any]) -> Any | None:
    """The AtteNT teacher among ``callbacks``, by duck typing: a ``history`` list and a score bank."""
    for callback in callbacks:
        if isinstance(getattr(callback, "history", None), list) and (
            hasattr(callback, "bank") or hasattr(callback, "score_bank")
        ):
            return callback
    return None


def teacher_scores(teacher: Any) -> tuple[Tensor, Tensor] | None:
    """(scores (N,) float32, measured (N,) bool) of the teacher's score bank, or None if it has none yet."""
    bank = getattr(teacher, "bank", None)
    if bank is None:
        bank = getattr(teacher, "score_bank", None)
    scores = getattr(bank, "scores", None)
    if scores is None:
        return None
    scores = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
    measured_at = getattr(bank, "measured_at", None)
    if measured_at is not None and torch.as_tensor(measured_at).numel() == scores.numel():
        measured = torch.as_tensor(measured_at).cpu().reshape(-1) >= 0
    else:
        measured = torch.ones_like(scores, dtype=torch.bool)  # a bank without the bookkeeping: trust all
    return scores, measured & torch.isfinite(scores)


def teacher_subset(teacher: Any) -> set[int]:
    """Dataset indices of the teacher's current pool: ``teacher.selection.indices`` or ``teacher.subset``.

    Empty when the teacher exposes neither (the gallery then draws no frames).
    """
    selection = getattr(teacher, "selection", None)
    for value in (getattr(selection, "indices", None), getattr(teacher, "subset", None)):
        if value is not None:
            return set(torch.as_tensor(value).reshape(-1).tolist())
    return set()


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


class SelectionGallery(_PictureCallback):
    """At every re-selection of the AtteNT teacher, draws its highest- and lowest-scored training images.

    The teacher is not edited: at each training epoch start (the teacher, last in the callback list, has prepared
    the epoch by then) this callback looks at the teacher's ``history`` and draws when it grew. Scores come from
    the teacher's score bank (never-measured samples are left out); images are the raw files of the training set
    (``train_dataset().load(index)``), not augmented. Samples in the new subset have a green frame.

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
        self._warned_pool = False

    def _teacher(self, trainer: pl.Trainer) -> Any | None:
        teacher = find_teacher(trainer.callbacks)
        if teacher is None and not self._warned:
            self._warned = True
            log.warning(
                "selection gallery: no AtteNT teacher (a callback with `history` and a score `bank`) among the "
                "callbacks; no galleries will be drawn"
            )
        return teacher

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run restored the teacher's history before this hook: its galleries exist already.
        teacher = self._teacher(trainer)
        self._seen = len(teacher.history) if teacher is not None else 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        teacher = self._teacher(trainer)
        if teacher is None or len(teacher.history) <= self._seen:
            return
        self._seen = len(teacher.history)
        event = teacher.history[-1] if isinstance(teacher.history[-1], Mapping) else {}
        epoch = int(event.get("epoch", trainer.current_epoch))
        self._guarded(
            f"selection gallery of epoch {epoch}", lambda: self.draw(trainer, teacher, event, epoch)
        )

    @rank_zero_only
    def draw(self, trainer: pl.Trainer, teacher: Any, event: Mapping[str, Any], epoch: int) -> Path | None:
        """Draws the gallery of the teacher's latest re-selection; None when nothing was scored."""
        found = teacher_scores(teacher)
        if found is None:
            if not self._warned:
                self._warned = True
                log.warning("selection gallery: the teacher's score bank has no `scores`; no galleries")
            return None
        scores, measured = found
        if not measured.any():  # e.g. random selection: nothing is scored
            log.info(
                "selection gallery: no sample scored for the re-selection of epoch %d; none drawn", epoch
            )
            return None
        dataset = trainer.datamodule.train_dataset()
        if len(dataset) != scores.numel():
            raise ValueError(f"the score bank holds {scores.numel()} scores, the training set {len(dataset)}")
        top, bottom = rank_samples(scores, measured, self.num_images)
        chosen = teacher_subset(teacher)
        if not chosen and event.get("k") and not self._warned_pool:
            self._warned_pool = True
            log.warning(
                "selection gallery: the teacher exposes no pool (selection.indices / subset); no frames"
            )

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
        k = event.get("k", len(chosen) or "?")
        title = (
            f"AtteNT re-selection for epoch {epoch} (cycle {event.get('cycle', '?')}, "
            f"{event.get('strategy', getattr(teacher, 'strategy', '?'))}): {int(measured.sum())} scored, k = {k} "
            "selected (green frame and caption)"
        )
        path = self.output_dir / "selection_gallery" / f"epoch_{epoch:03d}.png"
        log_image(
            trainer, "teacher/selection_gallery", mosaic(rows, title, cell=CELL_PX), path, trainer.global_step
        )
        return path
