"""Drawing helpers every picture of a run shares: colourings, a PIL mosaic of captioned tiles, the callback base
with its error policy and drawing-time bookkeeping, and the loggers' image output.

Files go into the run directory and, when such loggers are active, to TensorBoard (``add_image``) and W&B
(``log_image``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
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
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from attent_vision.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    "DEPTH_CMAP",
    "PictureCallback",
    "Tile",
    "colorize_depth",
    "colorize_labels",
    "colorize_values",
    "denormalize_rgb",
    "grid_figure",
    "log_figure",
    "log_image",
    "mosaic",
]

log = logging.getLogger(__name__)

_IGNORED_COLOUR = np.array([0, 0, 0], dtype=np.uint8)
DEPTH_CMAP = "magma_r"  # near = bright, in every depth picture


def denormalize_rgb(rgb: Tensor) -> np.ndarray:
    """(3, H, W) ImageNet-normalised → (H, W, 3) uint8."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    image = (rgb.detach().float().cpu() * std + mean).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _palette(num_classes: int) -> np.ndarray:
    cmap = plt.get_cmap("tab20" if num_classes > 10 else "tab10")
    colours = [cmap(i % cmap.N)[:3] for i in range(num_classes)]
    return (np.array(colours) * 255).round().astype(np.uint8)


def colorize_labels(labels: Tensor, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class ids → (H, W, 3) uint8; ignored pixels black."""
    ids = labels.detach().cpu().numpy().astype(np.int64)
    out = _palette(num_classes)[np.clip(ids, 0, num_classes - 1)]
    out[(ids == ignore_index) | (ids < 0) | (ids >= num_classes)] = _IGNORED_COLOUR
    return out


def colorize_depth(depth: Tensor, *, max_depth: float, valid: Tensor | None = None) -> np.ndarray:
    """(1, H, W) or (H, W) metres → (H, W, 3) uint8 with a fixed 0..max_depth scale; invalid pixels black."""
    values = depth.detach().float().cpu().reshape(depth.shape[-2:]).numpy()
    rgba = plt.get_cmap(DEPTH_CMAP)(np.clip(values / max_depth, 0, 1))
    out = (rgba[..., :3] * 255).round().astype(np.uint8)
    if valid is not None:
        out[~valid.detach().cpu().reshape(depth.shape[-2:]).numpy()] = _IGNORED_COLOUR
    return out


def grid_figure(rows: list[list[tuple[str, np.ndarray]]], title: str) -> plt.Figure:
    num_cols = max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), num_cols, figsize=(2.2 * num_cols, 2.2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(num_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                caption, image = row[c]
                ax.imshow(image, interpolation="nearest")
                ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _figure_to_array(fig: plt.Figure) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _image_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger | WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger | WandbLogger)]


def _send_image(trainer: pl.Trainer, key: str, image: np.ndarray, step: int) -> None:
    for logger in _image_loggers(trainer):
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")
        else:
            logger.log_image(key=key, images=[image], step=step)


def log_figure(trainer: pl.Trainer, key: str, fig: plt.Figure, path: Path, step: int) -> None:
    """Saves ``fig`` as PNG and sends it to the active image-capable loggers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    if _image_loggers(trainer):  # rendering the figure again costs as much as saving it
        _send_image(trainer, key, _figure_to_array(fig), step)
    plt.close(fig)


def log_image(trainer: pl.Trainer, key: str, image: np.ndarray, path: Path, step: int) -> None:
    """Saves an (H, W, 3) uint8 picture as PNG and sends it to the active image-capable loggers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    _send_image(trainer, key, image, step)


def colorize_values(values: Tensor, value_range: tuple[float, float], cmap: str = DEPTH_CMAP) -> np.ndarray:
    """(1, H, W) or (H, W) values → (H, W, 3) uint8 on a fixed range (values outside are clipped)."""
    array = values.detach().float().cpu().reshape(values.shape[-2:]).numpy()
    low, high = value_range
    rgba = plt.get_cmap(cmap)(np.clip((array - low) / max(high - low, 1e-12), 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


class PictureCallback(pl.Callback):
    """Run-directory output, error policy and drawing-time bookkeeping shared by the picture callbacks.

    ``summary_fields`` (collected into ``summary.json``: the run layer's SummaryContributor protocol) reports ``<name>_time_s``, the seconds spent
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
