"""Downstream data: ImageNet-S50-style classification folders and the prepared NYUv2 layout, as DataModules.

Both read the real on-disk formats; without a ``root`` of your own they first write the embedded procedural scenes in
those formats (`synthetic.downstream`). Items are dicts like the pretraining ones: the input modalities, the target
(``label``, ``semseg`` or ``depth``) and the int64 dataset ``index``.

Under DDP the DataModule shards the data itself: training with a shuffling ``DistributedSampler`` (drop_last, so every
rank runs the same number of steps), evaluation with Lightning's ``UnrepeatedDistributedSampler``, which gives each
sample to exactly one rank and pads nothing, so dataset-level metrics count every evaluation sample once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder

from .folder import MultiModalFolder
from .modalities import DataFormatError, read_rgb
from .sampler import SubsetSampler
from .synthetic.downstream import ensure_classification_scenes, ensure_nyu_like_scenes
from .transforms import DenseTransform, zero_bit_posterize
from .validate import ValidationReport, validate_folder, validate_image_folder
from .validation_cache import validation_cache_dir

__all__ = [
    "ClassificationDataModule",
    "DenseDataModule",
    "ImageFolderItems",
]

log = logging.getLogger(__name__)


class ImageFolderItems(ImageFolder):
    """``ImageFolder`` whose items are ``{"rgb", "label", "index"}`` and whose unreadable files name themselves."""

    def __init__(self, root: str | os.PathLike[str], transform: Any = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataFormatError(f"{root} is not a directory: expected <split>/<class>/<image> folders")
        try:
            # allow_empty: a class with no image in one split still keeps its index (same numbering in every split).
            # Files are filtered by ImageFolder's default, torchvision's IMG_EXTENSIONS (the list MultiModalFolder
            # accepts too, see constants.IMAGE_EXTENSIONS).
            super().__init__(str(root), transform=transform, loader=read_rgb, allow_empty=True)
        except FileNotFoundError as error:  # no class folder, or a class folder without images
            raise DataFormatError(f"{root}: {error}") from None

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label = super().__getitem__(index)
        return {
            "rgb": image,
            "label": torch.tensor(label, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }


class _ShardedLoaders(pl.LightningDataModule):
    """Loader plumbing shared by the downstream DataModules: sharding under DDP, and a training order that is a
    function of (seed, epoch) which a resumed run continues where the checkpoint left it.

    Training batches come from a ``SubsetSampler`` over the whole set: each epoch's order is drawn from the seed and
    the epoch (the same on every rank; rank r takes every W-th sample), so it does not depend on how many epochs
    this process has iterated. The checkpoint records the batches trained (``state_dict``); a run resumed from a
    checkpoint taken mid-epoch skips that epoch's trained samples, as an uninterrupted run would not see them again.
    """

    def __init__(
        self, *, batch_size: int, eval_batch_size: int | None, num_workers: int, pin_memory: bool, seed: int
    ):
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._resume_batches = 0  # training batches of the checkpoint this run resumes from

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        world, rank = self._world()
        sampler: Sampler[int] | None = None
        if train:
            sampler = SubsetSampler(len(dataset), seed=self.seed, num_replicas=world, rank=rank)
            if self._resume_batches:
                per_epoch = len(sampler) // self.batch_size  # drop_last
                epoch, done = divmod(self._resume_batches, max(per_epoch, 1))
                sampler.skip_in_epoch(epoch, done * self.batch_size)
        elif world > 1:
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def state_dict(self) -> dict[str, Any]:
        """The training batches done when the checkpoint is taken (optimizer steps x accumulation)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        return {"train_batches": int(trainer.global_step) * int(trainer.accumulate_grad_batches)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores this before it builds the train loader (configure_optimizers sizes the schedule).
        self._resume_batches = int(state_dict.get("train_batches", 0))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def fixed_val_samples(self, count: int) -> dict[str, torch.Tensor]:
        """The first ``count`` evaluation items as one batch (the prediction gallery shows the same ones)."""
        items = [self.val_set[i] for i in range(min(count, len(self.val_set)))]
        return torch.utils.data.default_collate(items)


class ClassificationDataModule(_ShardedLoaders):
    """Image classification from ``<root>/<train_dir>/<class>/*`` and ``<root>/<val_dir>/<class>/*`` (ImageNet-S50).

    Transforms are timm's: RandomResizedCrop + flip + RandAugment for training, resize by ``1/crop_pct`` and centre
    crop for evaluation. Mixup/CutMix and label smoothing act on batches, in the task module.

    Args:
        root: Dataset root holding the split folders.
        num_classes: Expected number of class folders; a mismatch fails at start-up (the reference trained a
            1000-way head for 50 classes).
        train_dir: Training split folder.
        val_dir: Evaluation split folder.
        synthetic: Generator parameters of the embedded scenes (written into ``root`` first); None reads ``root``.
            Its ``create`` (``auto``, ``true`` or ``false``; true when absent) says whether a missing ``root`` may
            be created.
        data_dir: ``paths.data_dir``: where ``synthetic.create=auto`` creates a missing ``root``, and where the data
            check caches its results when a split folder is read-only (None: in the user cache, ~/.cache).
        input_size: Crop side in pixels.
        crop_scale: RandomResizedCrop area range.
        auto_augment: timm RandAugment policy string, or None.
        color_jitter: Colour jitter strength (timm ignores it when ``auto_augment`` is set, as in the reference).
        interpolation: Resampling filter.
        re_prob: Random-erasing probability.
        crop_pct: Evaluation centre-crop fraction.
        batch_size: Per-device training batch.
        eval_batch_size: Per-device evaluation batch (default: batch_size).
        num_workers: Loader workers per device.
        pin_memory: Pin host memory.
        seed: Seeds shuffling and the sharding sampler.
    """

    def __init__(
        self,
        *,
        root: str,
        num_classes: int,
        train_dir: str = "train",
        val_dir: str = "val",
        synthetic: dict[str, Any] | None = None,
        data_dir: str | None = None,
        input_size: int = 224,
        crop_scale: Sequence[float] = (0.08, 1.0),
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.4,
        interpolation: str = "bicubic",
        re_prob: float = 0.0,
        crop_pct: float = 0.875,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
        )
        self.root = Path(root)
        self.num_classes = num_classes
        self.train_dir, self.val_dir = train_dir, val_dir
        self.synthetic = dict(synthetic) if synthetic is not None else None
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.input_size = input_size
        with zero_bit_posterize():
            self.train_transform = create_transform(
                input_size,
                is_training=True,
                scale=tuple(crop_scale),
                auto_augment=auto_augment,
                color_jitter=color_jitter,
                interpolation=interpolation,
                re_prob=re_prob,
            )
        self.eval_transform = create_transform(
            input_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation
        )

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            ensure_classification_scenes(self.root, data_dir=self.data_dir, **self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = ImageFolderItems(self.root / self.train_dir, transform=self.train_transform)
        self.val_set = ImageFolderItems(self.root / self.val_dir, transform=self.eval_transform)
        for split in (self.train_set, self.val_set):
            if len(split.classes) != self.num_classes:
                raise DataFormatError(
                    f"{split.root} has {len(split.classes)} class folders but data.num_classes={self.num_classes}; "
                    "set data.num_classes to the dataset's class count"
                )
        if self.train_set.classes != self.val_set.classes:
            raise DataFormatError(
                f"{self.root}: the class folders of {self.train_dir} and {self.val_dir} differ"
            )
        log.info(
            "data: %d train / %d val images, %d classes (%s)",
            len(self.train_set),
            len(self.val_set),
            self.num_classes,
            self.root,
        )

    def validate_files(self, *, min_size: int, workers: int | None = None) -> None:
        """Opens every train and val image once, before training, and raises listing every bad one (cached by
        file size and mtime, see `attent_vision.data.validate`).

        Args:
            min_size: Smallest accepted image side (the encoder's patch size).
            workers: Decoding threads (None: one per CPU, at most 8).

        Raises:
            DataFormatError: Listing each undecodable, non-8-bit or too small image.
        """
        self.setup("fit")
        reports = [
            validate_image_folder(
                split, min_size=min_size, workers=workers, fallback_dir=validation_cache_dir(self.data_dir)
            )
            for split in (self.train_set, self.val_set)
        ]
        ValidationReport.combine(reports).raise_if_problems()

    @property
    def class_names(self) -> list[str]:
        return list(self.val_set.classes)

    def val_targets(self) -> torch.Tensor:
        """Labels of the whole evaluation split, without decoding a single image."""
        return torch.as_tensor(self.val_set.targets, dtype=torch.int64)


class DenseDataModule(_ShardedLoaders):
    """Semantic segmentation or metric depth on the prepared NYUv2 layout ``<root>/<split>/<modality>/data/*.png``.

    Samples are paired across modalities by file stem (``MultiModalFolder``). Depth PNGs hold uint16 =
    metres × 65536 / ``depth_scale_m``; 0 means no reading. Label PNGs hold class ids with 0 = unlabeled
    (``reduce_zero_label``: 0 → ignore, k → k − 1).

    Args:
        root: Dataset root (e.g. the output of ``python -m attent_vision.data.prepare nyuv2``).
        inputs: Input modalities of the model ("rgb", or "rgb" and "depth").
        target: "semseg" or "depth".
        num_classes: Classes after label reduction (40 for NYUv2); only used for semseg.
        train_dir: Training split folder.
        val_dir: Evaluation split folder.
        synthetic: Generator parameters of the embedded scenes; None reads ``root``. Its ``create`` (``auto``,
            ``true`` or ``false``; true when absent) says whether a missing ``root`` may be created.
        data_dir: ``paths.data_dir``: where ``synthetic.create=auto`` creates a missing ``root``, and where the data
            check caches its results when a split folder is read-only (None: in the user cache, ~/.cache).
        input_size: Training crop / evaluation longest side.
        pad_to: Evaluation padding multiple (the encoder's patch size).
        augmentation: "semseg" (reference segmentation recipe) or "nyu" (reference depth recipe).
        scale_range: Random scale range of the segmentation recipe.
        color_augs: Colour augmentation in the "nyu" recipe.
        reduce_zero_label: Treat label 0 as unlabeled.
        depth_scale_m: Metres at the raw depth value 65536.
        batch_size: Per-device training batch.
        eval_batch_size: Per-device evaluation batch.
        num_workers: Loader workers per device.
        pin_memory: Pin host memory.
        seed: Seeds shuffling and the sharding sampler.
    """

    def __init__(
        self,
        *,
        root: str,
        inputs: Sequence[str] = ("rgb",),
        target: str = "semseg",
        num_classes: int = 40,
        train_dir: str = "train",
        val_dir: str = "test",
        synthetic: dict[str, Any] | None = None,
        data_dir: str | None = None,
        input_size: int = 256,
        pad_to: int = 16,
        augmentation: str = "semseg",
        scale_range: Sequence[float] = (0.1, 2.0),
        color_augs: bool = False,
        reduce_zero_label: bool = True,
        depth_scale_m: float = 10.0,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
        )
        if target not in ("semseg", "depth"):
            raise ValueError(f"target must be 'semseg' or 'depth', got {target!r}")
        unknown = sorted(set(inputs) - {"rgb", "depth"})
        if unknown or not inputs:
            raise ValueError(f"inputs must be 'rgb' and optionally 'depth', got {list(inputs)}")
        if target == "depth" and "depth" in inputs:
            raise ValueError("depth cannot be both an input and the target")
        self.root = Path(root)
        self.inputs = tuple(inputs)
        self.target = target
        self.num_classes = num_classes
        self.train_dir, self.val_dir = train_dir, val_dir
        self.synthetic = dict(synthetic) if synthetic is not None else None
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.input_size = input_size
        common = dict(
            input_size=input_size,
            pad_to=pad_to,
            augmentation=augmentation,
            scale_range=scale_range,
            color_augs=color_augs,
            reduce_zero_label=reduce_zero_label,
            depth_scale_m=depth_scale_m,
        )
        self.train_transform = DenseTransform(train=True, **common)
        self.eval_transform = DenseTransform(train=False, **common)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.inputs, self.target]))

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            ensure_nyu_like_scenes(self.root, data_dir=self.data_dir, **self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = MultiModalFolder(
            self.root / self.train_dir, modalities=self.modalities, transform=self.train_transform
        )
        self.val_set = MultiModalFolder(
            self.root / self.val_dir, modalities=self.modalities, transform=self.eval_transform
        )
        log.info(
            "data: %d train / %d eval images, inputs %s, target %s (%s)",
            len(self.train_set),
            len(self.val_set),
            list(self.inputs),
            self.target,
            self.root,
        )

    def validate_files(self, *, min_size: int, workers: int | None = None) -> None:
        """Opens every train and evaluation file once, before training, and raises listing every bad one (cached
        by file size and mtime, see `attent_vision.data.validate`).

        Args:
            min_size: Smallest accepted image side (the encoder's patch size).
            workers: Decoding threads (None: one per CPU, at most 8).

        Raises:
            DataFormatError: Listing each problem (undecodable file, wrong mode or bit depth, sizes differing
                across a sample's modalities, label id outside the classes, image under a patch).
        """
        self.setup("fit")
        transform = self.train_transform
        reports = [
            validate_folder(
                split,
                min_size=min_size,
                # Stored ids are checked: with reduce_zero_label, 0 (unlabeled) .. num_classes, plus the ignore index.
                num_classes=self.num_classes if self.target == "semseg" else None,
                ignore_index=transform.ignore_index,
                reduce_zero_label=transform.reduce_zero_label,
                workers=workers,
                fallback_dir=validation_cache_dir(self.data_dir),
            )
            for split in (self.train_set, self.val_set)
        ]
        ValidationReport.combine(reports).raise_if_problems()

    @property
    def class_names(self) -> list[str] | None:
        """Label names from the dataset's meta.json (written by `prepare nyuv2` and the embedded generator)."""
        try:
            names = json.loads((self.root / "meta.json").read_text())["semseg"]["class_names"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return list(names) if len(names) == self.num_classes else None

    def iter_val_targets(self) -> Any:
        """Yields the evaluation targets one image at a time, as the metrics see them (eval transform applied)."""
        for index in range(len(self.val_set)):
            raw = self.val_set.load(index)
            sample = self.eval_transform({self.target: raw[self.target]})
            yield index, sample[self.target]
