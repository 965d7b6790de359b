"""Downstream evaluation metrics (classification, semantic segmentation, monocular depth) on torchmetrics.

Every metric keeps only additive states (counts, sums, one confusion matrix) with ``dist_reduce_fx="sum"``, so
``compute()`` under DDP equals the single-process value over the whole evaluation set, provided each sample is
seen by exactly one rank. Use ``lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler`` for
evaluation: ``torch.utils.data.DistributedSampler`` pads the dataset to a multiple of the world size by repeating
samples, which would count those samples twice.

``compute()`` (and ``SegmentationMetrics.per_class`` / ``confusion_matrix``) gather states across ranks, so call
them on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

__all__ = [
    "ClassificationMetrics",
    "DepthMetrics",
    "SegmentationMetrics",
    "berhu_loss",
    "depth_valid_mask",
    "eigen_crop_mask",
]

# Eigen et al. (2014) NYUv2 evaluation crop, defined on the 480x640 frame: rows [45, 471), cols [41, 601).
_EIGEN_FRAME = (480, 640)
_EIGEN_ROWS = (45, 471)
_EIGEN_COLS = (41, 601)


# --------------------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------------------


class ClassificationMetrics(MetricCollection):
    """Top-k accuracy (micro, i.e. over samples) in percent, e.g. ``{"top1": 87.5, "top5": 99.0}``.

    Top-k values with ``k > num_classes`` are skipped (top-5 is meaningless, always 100%, with 3 classes).
    ``compute()`` and ``forward()`` return percent; log ``compute()``'s dict rather than passing the collection
    to ``LightningModule.log_dict`` (that would log the children's raw fractions).

    Args:
        num_classes: Number of classes K.
        top_k: The k values to report.
    """

    def __init__(self, *, num_classes: int, top_k: Sequence[int] = (1, 5)) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        ks = sorted({int(k) for k in top_k if 1 <= k <= num_classes})
        if not ks:
            raise ValueError(f"no top_k in {tuple(top_k)} is within [1, num_classes={num_classes}]")
        # compute_groups=False: torchmetrics would merge children whose states happen to match after the first
        # update, which is unsafe for accuracies that differ only in top_k.
        super().__init__(
            {f"top{k}": MulticlassAccuracy(num_classes=num_classes, average="micro", top_k=k) for k in ks},
            compute_groups=False,
        )
        self.num_classes = num_classes
        self.top_k = tuple(ks)

    def update(self, logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        """Accumulate a batch.

        Args:
            logits: Class scores, [B, K].
            target: Class ids, [B] int64.
        """
        super().update(logits, target)

    def forward(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        return _to_percent(super().forward(logits, target))

    def compute(self) -> dict[str, Tensor]:
        return _to_percent(super().compute())


def _to_percent(values: dict[str, Any]) -> dict[str, Tensor]:
    return {k: v * 100.0 for k, v in values.items()}


# --------------------------------------------------------------------------------------------------------------
# Semantic segmentation
# --------------------------------------------------------------------------------------------------------------


class SegmentationMetrics(Metric):
    """mIoU / mAcc / aAcc in percent from one confusion matrix accumulated over the whole evaluation set.

    Pixels whose target is ``ignore_index`` are not counted, whatever is predicted there. From the (K, K)
    confusion matrix (rows = ground truth, cols = prediction): IoU_c = TP/(TP+FP+FN), Acc_c = TP/(TP+FN),
    aAcc = trace/sum.

    Absent classes follow mmseg (``nanmean`` over per-class values):

    - a class absent from the ground truth of the whole set (TP+FN == 0) has Acc = NaN and is left out of mAcc;
    - its IoU is 0 if it was predicted somewhere (union = FP > 0), and that 0 *counts* in mIoU (false positives
      of a class that does not occur are penalised); it is NaN, and left out of mIoU, only if it was neither in
      the ground truth nor predicted.

    Args:
        num_classes: Number of classes K.
        ignore_index: Target value of pixels that are not evaluated.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confmat: Tensor

    def __init__(self, *, num_classes: int, ignore_index: int = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} collides with a class id (num_classes={num_classes})"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # int64 counts: float32 would stop counting exactly past 2^24 pixels.
        self.add_state(
            "confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulate a batch.

        Args:
            preds: Logits [B, K, H, W] (argmax taken over K) or predicted class ids [B, H, W].
            target: Class ids or ``ignore_index``, [B, H, W].
        """
        if preds.is_floating_point():
            if preds.ndim != 4 or preds.shape[1] != self.num_classes:
                raise ValueError(f"logits must be [B, {self.num_classes}, H, W], got {tuple(preds.shape)}")
            preds = preds.argmax(dim=1)  # [B, H, W]
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        keep = target != self.ignore_index
        gt, pr = target[keep].long(), preds[keep].long()  # [N]
        k = self.num_classes
        if gt.numel() and (gt.min() < 0 or gt.max() >= k):
            raise ValueError(f"target has ids outside [0, {k}) that are not ignore_index={self.ignore_index}")
        if pr.numel() and (pr.min() < 0 or pr.max() >= k):
            raise ValueError(f"predicted ids outside [0, {k})")
        self.confmat += torch.bincount(gt * k + pr, minlength=k * k).reshape(k, k)

    def compute(self) -> dict[str, Tensor]:
        iou, acc, aacc = self._scores(self.confmat)
        return {"mIoU": iou.nanmean().float(), "mAcc": acc.nanmean().float(), "aAcc": aacc.float()}

    def per_class(self) -> dict[str, list[float]]:
        """Per-class IoU and Acc in percent (NaN where undefined, see the class docstring), over all ranks."""
        iou, acc, _ = self._scores(self.confusion_matrix())
        return {"IoU": iou.tolist(), "Acc": acc.tolist()}

    def confusion_matrix(self) -> Tensor:
        """The (K, K) int64 confusion matrix over all ranks; rows = ground truth, cols = prediction."""
        with self.sync_context():
            return self.confmat.clone()

    @staticmethod
    def _scores(confmat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # float64: exact for pixel counts far beyond float32's 2^24.
        cm = confmat.double()
        tp = cm.diagonal()
        gt = cm.sum(dim=1)  # TP + FN
        pred = cm.sum(dim=0)  # TP + FP
        union = gt + pred - tp
        nan = torch.full_like(tp, math.nan)
        iou = torch.where(union > 0, tp / union.clamp_min(1), nan) * 100.0
        acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan) * 100.0
        total = cm.sum()
        aacc = tp.sum() / total * 100.0 if total > 0 else total.new_tensor(math.nan)
        return iou, acc, aacc


# --------------------------------------------------------------------------------------------------------------
# Monocular depth
# --------------------------------------------------------------------------------------------------------------


def depth_valid_mask(target: Tensor, *, min_depth: float, max_depth: float) -> Tensor:
    """Pixels with a usable ground-truth depth: finite, > 0, >= ``min_depth`` and <= ``max_depth``.

    Shared by ``DepthMetrics`` and the depth loss so that training and evaluation agree on what is valid.

    Args:
        target: Ground-truth depth in metres, any shape.
        min_depth: Smallest valid depth (0 = missing is always invalid).
        max_depth: Largest valid depth.

    Returns:
        Bool tensor shaped like ``target``.
    """
    return torch.isfinite(target) & (target > 0) & (target >= min_depth) & (target <= max_depth)


def eigen_crop_mask(height: int, width: int, *, device: torch.device | str | None = None) -> Tensor:
    """Bool [H, W] mask of the NYUv2 Eigen crop: rows 45:471, cols 41:601 on a 480x640 frame.

    For other sizes each bound is scaled proportionally and rounded half up (``floor(45 * H / 480 + 0.5)``
    etc.), so the crop covers the same part of the scene at any resolution.

    Args:
        height: Image height H.
        width: Image width W.
        device: Device of the returned mask.
    """
    fh, fw = _EIGEN_FRAME
    # Half up rather than Python's round-half-even, so the bounds are what the docstring says.
    top, bottom = (math.floor(r * height / fh + 0.5) for r in _EIGEN_ROWS)
    left, right = (math.floor(c * width / fw + 0.5) for c in _EIGEN_COLS)
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    mask[top:bottom, left:right] = True
    return mask


class DepthMetrics(Metric):
    """Standard monocular depth metrics (metres) over the valid pixels of the whole evaluation set.

    Valid pixels: ``depth_valid_mask`` (finite, > 0, in [min_depth, max_depth]) and, with ``eigen_crop``, inside
    the Eigen crop (see ``eigen_crop_mask``). Predictions at invalid pixels are ignored entirely. Predictions are
    clamped to [min_depth, max_depth] before every metric (the usual BTS/AdaBins protocol; it also keeps the
    log metrics and ratios finite).

    Every metric is averaged over all valid pixels of the dataset (pixel-averaged), not per image then over
    images as some papers do; the two differ when images have different numbers of valid pixels.

    ``compute()`` returns ``delta1``/``delta2``/``delta3`` (percent of pixels with max(p/t, t/p) < 1.25^i),
    ``abs_rel`` = mean |p−t|/t, ``sq_rel`` = mean (p−t)²/t, ``rmse`` = sqrt(mean (p−t)²),
    ``rmse_log`` = sqrt(mean (ln p − ln t)²) and ``log10`` = mean |log10 p − log10 t|.

    Args:
        min_depth: Smallest valid depth in metres; also the lower clamp of predictions.
        max_depth: Largest valid depth in metres; also the upper clamp of predictions.
        eigen_crop: Evaluate only inside the NYUv2 Eigen crop.
    """

    is_differentiable = False
    higher_is_better = None  # mixed: delta up, errors down
    full_state_update = False

    _SUMS = ("abs_rel", "sq_rel", "sq_err", "sq_log", "abs_log10")
    _COUNTS = ("n", "delta1", "delta2", "delta3")

    def __init__(
        self, *, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)
        self.eigen_crop = eigen_crop
        # float64 sums / int64 counts: millions of pixels per set would lose precision in float32.
        for name in self._SUMS:
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in self._COUNTS:
            self.add_state(name, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def valid_mask(self, target: Tensor) -> Tensor:
        """Bool mask of the evaluated pixels of ``target`` [..., H, W]: depth range and optional Eigen crop."""
        valid = depth_valid_mask(target, min_depth=self.min_depth, max_depth=self.max_depth)
        if self.eigen_crop:
            valid = valid & eigen_crop_mask(*target.shape[-2:], device=target.device)
        return valid

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Accumulate a batch.

        Args:
            pred: Predicted depth in metres, [B, 1, H, W] or [B, H, W].
            target: Ground-truth depth in metres, same shape as ``pred``.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        if pred.ndim not in (3, 4) or (pred.ndim == 4 and pred.shape[1] != 1):
            raise ValueError(f"expected [B, 1, H, W] or [B, H, W], got {tuple(pred.shape)}")
        valid = self.valid_mask(target)
        t = target[valid].double()  # [N]
        p = pred.detach()[valid].double().clamp(self.min_depth, self.max_depth)  # [N]
        diff = p - t
        ratio = torch.maximum(p / t, t / p)
        log_diff = p.log() - t.log()
        self.n += t.numel()
        self.abs_rel += (diff.abs() / t).sum()
        self.sq_rel += (diff.square() / t).sum()
        self.sq_err += diff.square().sum()
        self.sq_log += log_diff.square().sum()
        self.abs_log10 += (p.log10() - t.log10()).abs().sum()
        self.delta1 += (ratio < 1.25).sum()
        self.delta2 += (ratio < 1.25**2).sum()
        self.delta3 += (ratio < 1.25**3).sum()

    def compute(self) -> dict[str, Tensor]:
        # No valid pixel at all gives NaN (0/0) rather than a misleading perfect score.
        n = self.n.double()
        out = {
            "delta1": self.delta1 / n * 100.0,
            "delta2": self.delta2 / n * 100.0,
            "delta3": self.delta3 / n * 100.0,
            "abs_rel": self.abs_rel / n,
            "sq_rel": self.sq_rel / n,
            "rmse": (self.sq_err / n).sqrt(),
            "rmse_log": (self.sq_log / n).sqrt(),
            "log10": self.abs_log10 / n,
        }
        return {k: v.float() for k, v in out.items()}


def berhu_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Reverse Huber (berHu) loss averaged over valid pixels.

    With d = pred − target and c = 0.2 · max|d| over the valid pixels of the batch (at least 1e-5, and treated
    as a constant): |d| where |d| <= c, else (d² + c²) / (2c). Returns a zero scalar that still carries a graph
    when no pixel is valid, so the backward pass of a batch without ground truth is a no-op.

    Args:
        pred: Predicted depth, any shape.
        target: Ground-truth depth, same shape; values at invalid pixels may be NaN.
        valid: Bool mask, same shape (e.g. from ``depth_valid_mask``).

    Returns:
        Scalar loss.
    """
    if not pred.shape == target.shape == valid.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)}, target {tuple(target.shape)}, valid {tuple(valid.shape)} must match"
        )
    # Select before subtracting so NaN targets at invalid pixels never enter the graph.
    d = pred[valid] - target[valid]  # [N]
    if d.numel() == 0:
        return d.sum()  # 0.0, differentiable w.r.t. pred with zero gradient
    abs_d = d.abs()
    c = (0.2 * abs_d.detach().max()).clamp_min(1e-5)
    return torch.where(abs_d <= c, abs_d, (d.square() + c.square()) / (2 * c)).mean()
