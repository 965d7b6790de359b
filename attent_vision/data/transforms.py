"""Transforms: the pretraining modalities' joint augmentation (one crop and one flip decision shared by every
modality), the dense downstream tasks' (:class:`DenseTransform`), and the classification RandAugment fix
(:func:`zero_bit_posterize`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data import auto_augment as timm_auto_augment
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .constants import SEG_IGNORE_INDEX
from .modalities import MODALITIES

__all__ = ["DenseTransform", "DepthMap", "MultiModalTransform", "to_tensors", "zero_bit_posterize"]

InterpolationMode = v2.InterpolationMode


def _as_tensors(sample: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    unknown = set(sample) - set(MODALITIES)
    if unknown:
        raise ValueError(f"cannot transform modalities {sorted(unknown)}; supported: {list(MODALITIES)}")
    tensors = {name: MODALITIES[name].to_tensor(value) for name, value in sample.items()}
    sizes = {name: tuple(t.shape[-2:]) for name, t in tensors.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"modalities differ in size (H, W): {sizes}")
    return tensors


def to_tensors(sample: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Converts raw modalities to tensors without resizing or augmentation.

    Args:
        sample: Registered modalities (`modalities.MODALITIES`), e.g. "rgb" (PIL image or HWC uint8), "depth"
            (raw uint16), "semseg" (class ids).

    Returns:
        Each modality as its registry converter gives it, e.g. rgb as uint8 (3, H, W) and depth as float32
        (1, H, W) = raw / 2**16; class-id maps (semseg) as int64 (H, W).
    """
    tensors = _as_tensors(sample)
    for name, tensor in tensors.items():
        if MODALITIES[name].class_ids:
            tensors[name] = tensor.squeeze(0).to(torch.int64)
    return tensors


class MultiModalTransform:
    """Crops, resizes, flips and converts the modalities of a sample with the same geometry for every modality.

    Train mode draws one RandomResizedCrop box and one horizontal-flip decision from torch's global RNG (so
    DataLoader worker seeding applies) and applies them to every modality, each with its own filter from the
    registry (`modalities.MODALITIES`; with antialiasing): bicubic for rgb, bilinear for depth, nearest-exact for
    labels. The box is drawn once with torchvision's `RandomResizedCrop.get_params` and applied with
    `v2.functional` kernels, because a single v2 transform object carries one interpolation for all images and
    rgb and depth need different ones. Modalities stay plain tensors, not tv_tensors: v2 resizes a tv_tensors.Mask
    with plain NEAREST whatever interpolation it is given. Eval mode takes the central square of side min(H, W)
    and resizes it to `input_size` (the same as resizing the shorter side and centre cropping), without
    randomness.

    Args:
        input_size: Output side S in pixels.
        train: Random crop and flip when True; deterministic centre crop when False.
        scale: RandomResizedCrop area fraction range.
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: Probability of a horizontal flip (train mode only).
        semseg_stride: Class-id maps (semseg) are returned at S / semseg_stride (MultiMAE predicts semseg at
            stride 4).
        rgb_mean: Per-channel mean used to normalise rgb (the modalities marked `normalize`) in [0, 1].
        rgb_std: Per-channel standard deviation used to normalise rgb.

    Returns (from `__call__`):
        The modalities present in the input, in registry order: rgb float32 (3, S, S) normalised, depth float32
        (1, S, S) = raw / 2**16, semseg int64 (S / semseg_stride, S / semseg_stride).
    """

    def __init__(
        self,
        *,
        input_size: int,
        train: bool = True,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (0.75, 4 / 3),
        hflip: float = 0.5,
        semseg_stride: int = 4,
        rgb_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        rgb_std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        if input_size <= 0 or semseg_stride <= 0:
            raise ValueError(
                f"input_size and semseg_stride must be positive, got {input_size} and {semseg_stride}"
            )
        if input_size % semseg_stride:
            raise ValueError(f"input_size {input_size} is not divisible by semseg_stride {semseg_stride}")
        if not (len(scale) == 2 and 0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {tuple(scale)}")
        if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {tuple(ratio)}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        if len(rgb_mean) != 3 or len(rgb_std) != 3:
            raise ValueError("rgb_mean and rgb_std must have 3 values each")
        self.input_size = input_size
        self.train = train
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        self.semseg_stride = semseg_stride
        # Folding 1/255 into mean and std turns normalisation into one multiply-add on the uint8 values.
        std = torch.tensor(rgb_std, dtype=torch.float32).view(3, 1, 1)
        self._rgb_mul = 1.0 / (255.0 * std)
        self._rgb_add = -torch.tensor(rgb_mean, dtype=torch.float32).view(3, 1, 1) / std

    def _crop_box(self, reference: torch.Tensor) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the region that becomes the S×S output."""
        if self.train:
            return v2.RandomResizedCrop.get_params(reference, list(self.scale), list(self.ratio))
        height, width = reference.shape[-2:]
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Transforms one sample; see the class docstring for input and output formats."""
        tensors = _as_tensors(sample)
        if not tensors:
            return {}
        top, left, height, width = self._crop_box(next(iter(tensors.values())))
        flip = self.train and self.hflip > 0 and bool(torch.rand(()) < self.hflip)
        size = [self.input_size, self.input_size]

        def crop(tensor: torch.Tensor, interpolation: InterpolationMode) -> torch.Tensor:
            return F.resized_crop(
                tensor, top, left, height, width, size, interpolation=interpolation, antialias=True
            )

        out: dict[str, torch.Tensor] = {}
        for name in [m for m in MODALITIES if m in tensors]:  # registry order, whatever the sample's order
            modality = MODALITIES[name]
            interpolation = InterpolationMode(modality.interpolation)
            tensor = crop(tensors[name], interpolation)
            if modality.normalize:
                tensor = tensor.to(torch.float32) * self._rgb_mul + self._rgb_add
            elif modality.class_ids:
                # Labels are cut from the same S×S crop, then reduced to the prediction stride (as in the reference).
                if self.semseg_stride != 1:
                    small = self.input_size // self.semseg_stride
                    tensor = F.resize(tensor, [small, small], interpolation=interpolation, antialias=False)
                tensor = tensor.squeeze(0).to(torch.int64)
            out[name] = tensor
        if flip:
            # Flipped last, so that a flipped sample is the exact mirror image of the unflipped one at every stride.
            out = {name: tensor.flip(-1) for name, tensor in out.items()}
        return out

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (
            f"{type(self).__name__}(input_size={self.input_size}, mode={mode}, scale={self.scale}, "
            f"ratio={self.ratio}, hflip={self.hflip}, semseg_stride={self.semseg_stride})"
        )


# ---------------------------------------------------------------------------------------------------- downstream (dense tasks)

# Fill of the padded border: grey for the image (as the reference pads before normalising), "ignore" for labels
# and "no reading" for depth, so padding never counts in a loss or a metric.
IMAGE_PAD = 128
DEPTH_PAD = 0.0


class DepthMap(tv_tensors.Mask):
    """Metric depth (1, H, W) in metres: resampled like a mask (nearest, so holes stay holes), padded with 0."""


class DenseTransform:
    """Joint transforms for dense fine-tuning with ``torchvision.transforms.v2`` on tv_tensors.

    The image is a ``tv_tensors.Image``, the label map a ``tv_tensors.Mask`` and depth a :class:`DepthMap`, so one
    v2 pipeline applies the same flip, scale and crop to all of them, with bicubic (antialiased) resampling for the
    image and nearest for labels and depth.

    Train (``augmentation="semseg"``, the reference segmentation recipe): flip, longest side to ``input_size``,
    colour jitter (p 0.5), random scale in ``scale_range``, pad and random crop to ``input_size``. Train
    (``"nyu"``, the reference depth recipe): shorter side to ``input_size``, flip, optional colour jitter and
    grayscale, random crop. Evaluation: the whole image with its longest side resized to ``input_size`` (never
    cropped, so every pixel of the evaluation set is scored), padded at the bottom and right to a multiple of
    ``pad_to`` (the patch size).

    Args:
        train: Random augmentation when True.
        input_size: Crop size (train) / longest side (eval) in pixels.
        pad_to: Evaluation images are padded to a multiple of this (the encoder's patch size).
        augmentation: "semseg" or "nyu" (train only).
        scale_range: Random scale range of the "semseg" recipe (the reference uses 0.1..2.0).
        color_augs: Colour jitter and grayscale in the "nyu" recipe.
        reduce_zero_label: Label 0 means unlabeled: map it to ``ignore_index`` and shift the others down by one.
        ignore_index: Label value that losses and metrics ignore.
        depth_scale_m: Metres represented by the raw depth value 65536 (10 for NYUv2).
    """

    def __init__(
        self,
        *,
        train: bool,
        input_size: int,
        pad_to: int = 16,
        augmentation: str = "semseg",
        scale_range: Sequence[float] = (0.1, 2.0),
        color_augs: bool = False,
        reduce_zero_label: bool = True,
        ignore_index: int = SEG_IGNORE_INDEX,
        depth_scale_m: float = 10.0,
    ) -> None:
        if augmentation not in ("semseg", "nyu"):
            raise ValueError(f"augmentation must be 'semseg' or 'nyu', got {augmentation!r}")
        self.train = train
        self.input_size = input_size
        self.pad_to = pad_to
        self.augmentation = augmentation
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.depth_scale_m = depth_scale_m
        fill = {tv_tensors.Image: IMAGE_PAD, tv_tensors.Mask: ignore_index, DepthMap: DEPTH_PAD}
        size = input_size
        if not train:
            self.geometry = v2.Resize(size=None, max_size=size, antialias=True)
        elif augmentation == "semseg":
            self.geometry = v2.Compose(
                [
                    v2.RandomHorizontalFlip(),
                    v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.5),
                    v2.ScaleJitter(target_size=(size, size), scale_range=tuple(scale_range), antialias=True),
                    v2.RandomCrop(size, pad_if_needed=True, fill=fill),
                ]
            )
        else:
            colour = (
                [
                    v2.RandomApply(
                        [v2.ColorJitter(brightness=0.1255, contrast=0.4, saturation=(0.5, 1.5), hue=0.2)],
                        p=0.5,
                    ),
                    v2.RandomGrayscale(p=0.3),
                ]
                if color_augs
                else []
            )
            self.geometry = v2.Compose(
                [
                    v2.Resize(size, antialias=True),
                    v2.RandomHorizontalFlip(),
                    *colour,
                    v2.RandomCrop(size, pad_if_needed=True, fill=fill),
                ]
            )
        self.fill = fill
        self.normalize = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
        )

    def to_tv_tensors(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """Raw modalities (PIL rgb, uint16 depth, uint8 ids) → tv_tensors with labels remapped and depth in m."""
        out: dict[str, Any] = {}
        if "rgb" in sample:
            out["rgb"] = tv_tensors.Image(
                torch.from_numpy(np.array(sample["rgb"], dtype=np.uint8)).permute(2, 0, 1)
            )
        if "depth" in sample:
            raw = torch.from_numpy(np.asarray(sample["depth"], dtype=np.float32))
            out["depth"] = (raw * (self.depth_scale_m / 65536.0)).unsqueeze(0).as_subclass(DepthMap)
        if "semseg" in sample:
            labels = torch.from_numpy(np.asarray(sample["semseg"], dtype=np.int64))
            if self.reduce_zero_label:
                ignored = (labels == 0) | (labels == self.ignore_index)
                labels = torch.where(ignored, self.ignore_index, labels - 1)
            out["semseg"] = tv_tensors.Mask(labels)
        return out

    def pad_to_multiple(self, sample: dict[str, Any]) -> dict[str, Any]:
        height, width = next(iter(sample.values())).shape[-2:]
        bottom, right = -height % self.pad_to, -width % self.pad_to
        if not bottom and not right:
            return sample
        return v2.Pad([0, 0, right, bottom], fill=self.fill)(sample)

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = self.geometry(self.to_tv_tensors(sample))
        if not self.train:
            out = self.pad_to_multiple(out)
        if "rgb" in out:
            out["rgb"] = self.normalize(out["rgb"])
        return {name: value.as_subclass(torch.Tensor) for name, value in out.items()}


def _posterize(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, with 0 bits giving the black image that Pillow used to return for it."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


@contextmanager
def zero_bit_posterize() -> Iterator[None]:
    """While building a timm transform, its RandAugment posterize ops take :func:`_posterize` (bound at build time).

    timm's RandAugment ("rand-m9-mstd0.5-inc1", the reference policy) asks for 0 bits whenever the magnitude noise
    reaches 10; current Pillow raises on that, which killed a loader worker in about 1 of 40 batches. Only the
    transforms built inside this block are affected; timm's table is restored after it.
    """
    names = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")
    saved = {name: timm_auto_augment.NAME_TO_OP[name] for name in names}
    timm_auto_augment.NAME_TO_OP.update(dict.fromkeys(names, _posterize))
    try:
        yield
    finally:
        timm_auto_augment.NAME_TO_OP.update(saved)
