"""Per-sample masked reconstruction losses and depth standardisation of MultiMAE pretraining.

Every loss returns a :class:`SampleLoss` of per-sample values first; :func:`reduce_batch` gives the reference's
batch reduction (mean over the samples that have masked pixels, i.e. ``nanmean`` of the per-sample means).
:func:`default_loss` builds the loss a modality's registry entry names.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from attent_vision.data.modalities import NORM_PIX_TASK, get_modality, loss_target

__all__ = [
    "MaskedCrossEntropyLoss",
    "MaskedL1Loss",
    "MaskedMSELoss",
    "SampleLoss",
    "default_loss",
    "reduce_batch",
    "truncated_depth_standardize",
    "upsample_token_mask",
]


class SampleLoss(NamedTuple):
    """Per-sample loss.

    Attributes:
        value: (B,) float32 masked mean of the per-pixel loss; 0 where ``count`` is 0.
        count: (B,) int64 number of pixels that entered the mean.
    """

    value: Tensor
    count: Tensor


def reduce_batch(loss: SampleLoss) -> Tensor:
    """Mean of ``loss.value`` over samples with ``count > 0`` (reference nanmean); 0 when there are none."""
    has_pixels = (loss.count > 0).to(loss.value.dtype)  # [B]
    return (loss.value * has_pixels).sum() / has_pixels.sum().clamp_min(1.0)


def upsample_token_mask(mask: Tensor, size: tuple[int, int], scale: int) -> Tensor:
    """Nearest-upsamples a (B, N) token mask to (B, H, W) pixels, each token covering a scale×scale block.

    Args:
        mask: Token mask, (B, N_H·N_W) row-major, 1 = masked.
        size: Pixel size (H, W), multiples of ``scale``.
        scale: Patch size in pixels on this map (patch_size // stride).
    """
    h, w = size
    if h % scale or w % scale or mask.shape[1] != (h // scale) * (w // scale):
        raise ValueError(
            f"token mask {tuple(mask.shape)} does not tile a {h}x{w} map with {scale}x{scale} patches"
        )
    return repeat(mask.float(), "b (nh nw) -> b (nh ph) (nw pw)", nh=h // scale, ph=scale, pw=scale)


def masked_sample_mean(loss: Tensor, weight: Tensor | None) -> SampleLoss:
    """Per-sample Σ(loss·weight)/Σweight of a (B, H, W) loss map; plain per-sample mean when weight is None."""
    loss = loss.float()
    if weight is None:
        return SampleLoss(
            loss.flatten(1).mean(1), torch.full_like(loss[:, 0, 0], loss[0].numel(), dtype=torch.long)
        )
    total = (loss * weight).flatten(1).sum(1)  # [B]
    count = weight.flatten(1).sum(1)  # [B]
    value = torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))
    return SampleLoss(value, count.round().long())


class _MaskedPixelLoss(nn.Module, ABC):
    """Shared patch geometry and norm-pix target of the regression losses."""

    def __init__(
        self, *, patch_size: int = 16, stride: int = 1, norm_pix: bool = False, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.stride = stride
        self.scale_factor = max(1, patch_size // stride)
        self.norm_pix = norm_pix
        self.eps = eps

    def normalise_target(self, target: Tensor) -> Tensor:
        """Standardises each (p p c) patch of target by its mean and unbiased variance (MAE norm-pix)."""
        p = self.scale_factor
        if p * p * target.shape[1] < 2:
            raise ValueError("norm_pix needs at least two values per patch")
        patches = rearrange(target, "b c (nh p1) (nw p2) -> b (nh nw) (p1 p2 c)", p1=p, p2=p)  # [B, N, p·p·C]
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True, unbiased=True)
        patches = (patches - mean) / torch.sqrt(var + self.eps)
        return rearrange(
            patches, "b (nh nw) (p1 p2 c) -> b c (nh p1) (nw p2)", nh=target.shape[-2] // p, p1=p, p2=p
        )

    @abstractmethod
    def element_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-element loss (B, C, H, W) of the (possibly normalised) target."""

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> SampleLoss:
        """Per-sample loss of pred/target (B, C, H, W), over masked patches of mask (B, N) when given."""
        pred, target = pred.float(), target.float()
        if self.norm_pix:
            target = self.normalise_target(target)
        loss = self.element_loss(pred, target).mean(dim=1)  # [B, H, W]
        weight = None if mask is None else upsample_token_mask(mask, loss.shape[-2:], self.scale_factor)
        return masked_sample_mean(loss, weight)


class MaskedMSELoss(_MaskedPixelLoss):
    """Masked mean squared error, per sample.

    Args:
        patch_size: Patch size on the full image.
        stride: Stride level of the task (the loss patch is patch_size // stride).
        norm_pix: Standardise the target per patch (unbiased variance, eps 1e-6).
    """

    def element_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(pred, target, reduction="none")


class MaskedL1Loss(_MaskedPixelLoss):
    """Masked mean absolute error, per sample.

    Args:
        patch_size: Patch size on the full image.
        stride: Stride level of the task (the loss patch is patch_size // stride).
        norm_pix: Standardise the target per patch (unbiased variance, eps 1e-6).
    """

    def element_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.l1_loss(pred, target, reduction="none")


class MaskedCrossEntropyLoss(nn.Module):
    """Masked per-pixel cross-entropy, per sample.

    Pixels whose label equals ``ignore_index`` are excluded from both the numerator and the denominator (the
    reference kept them in the denominator; pretraining labels have no ignored pixels, so values agree there).

    Args:
        patch_size: Patch size on the full image.
        stride: Stride level of the task (the loss patch is patch_size // stride).
        label_smoothing: Label smoothing of the cross-entropy.
        ignore_index: Label excluded from the loss.
    """

    def __init__(
        self, *, patch_size: int = 16, stride: int = 1, label_smoothing: float = 0.0, ignore_index: int = -100
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.stride = stride
        self.scale_factor = max(1, patch_size // stride)
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> SampleLoss:
        """Per-sample CE of logits (B, K, H, W) against labels (B, H, W), over masked patches when given."""
        loss = F.cross_entropy(
            pred.float(),
            target.long(),
            reduction="none",
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
        )  # [B, H, W]
        weight = (target != self.ignore_index).float()  # [B, H, W]
        if mask is not None:
            weight = weight * upsample_token_mask(mask, loss.shape[-2:], self.scale_factor)
        return masked_sample_mean(loss, weight)


def default_loss(task: str, *, patch_size: int, stride: int) -> nn.Module:
    """The pretraining loss of an output task, as the registry entry of its modality names it.

    The normalised-pixel output (``norm_rgb``) gets the image's loss with ``norm_pix=True``.

    Args:
        task: Output task: a registered modality or ``norm_rgb``.
        patch_size: Patch size on the full image.
        stride: Stride level of the task's prediction.
    """
    modality = get_modality(loss_target(task))
    module_name, _, class_name = modality.loss.rpartition(".")
    loss_class = getattr(importlib.import_module(module_name), class_name)
    kwargs = {**modality.loss_kwargs, **({"norm_pix": True} if task == NORM_PIX_TASK else {})}
    return loss_class(patch_size=patch_size, stride=stride, **kwargs)


def truncated_depth_standardize(
    depth: Tensor, *, low: float = 0.1, high: float = 0.9, eps: float = 1e-6
) -> Tensor:
    """Standardises each sample by the mean and unbiased std of its central [10 %, 90 %) value range.

    Per sample, all C·H·W values are sorted and the slice [floor(low·n), floor(high·n)) gives the statistics:
    ``(d - mean) / sqrt(var + eps)``.

    Args:
        depth: (B, ...) depth maps, e.g. (B, 1, H, W).
        low: Lower quantile of the kept slice.
        high: Upper quantile (exclusive) of the kept slice.
        eps: Added to the variance.

    Returns:
        Tensor of the same shape and dtype.
    """
    flat = depth.float().flatten(1)  # [B, n]
    n = flat.shape[1]
    lo, hi = int(low * n), int(high * n)
    if hi - lo < 2:
        raise ValueError(f"truncated_depth_standardize needs more values per sample, got {n}")
    kept = flat.sort(dim=1).values[:, lo:hi]  # [B, n_kept]
    mean = kept.mean(dim=1)
    std = torch.sqrt(kept.var(dim=1, unbiased=True) + eps)
    shape = (-1,) + (1,) * (depth.ndim - 1)
    return ((depth.float() - mean.view(shape)) / std.view(shape)).to(depth.dtype)
