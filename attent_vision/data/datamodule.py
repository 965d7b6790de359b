"""LightningDataModule for multi-modal pretraining data in the MultiMAE folder layout."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, Sampler

from attent_vision.data.folder import MultiModalFolder
from attent_vision.data.synthetic import ensure_synthetic_dataset
from attent_vision.data.transforms import MultiModalTransform

log = logging.getLogger(__name__)


class MultiModalDataModule(pl.LightningDataModule):
    """Train/val loaders over ``<root>/<split>/<modality>/<class>/<stem>.<ext>``.

    Args:
        root: Dataset root holding the split folders.
        train_dir: Train split folder under ``root``.
        val_dir: Validation split folder under ``root``.
        synthetic: Generator parameters; when given, the synthetic scenes are generated into ``root`` on first
            use (and reused afterwards). ``None`` reads an existing dataset.
        modalities: Modalities to load, in token order.
        num_classes: Semantic classes in the semseg maps (the model's class embedding size).
        input_size: Square crop size fed to the model.
        semseg_stride: Semseg maps are returned at ``input_size / semseg_stride``.
        crop_scale: Area range of the random-resized crop.
        hflip: Probability of the shared horizontal flip.
        batch_size: Per-device batch size.
        num_workers: DataLoader workers per device.
        pin_memory: Pin host memory (useful on GPUs).
    """

    def __init__(
            self,
            *,
            root: str,
            train_dir: str = "train",
            val_dir: str = "val",
            synthetic: dict[str, Any] | None = None,
            modalities: Sequence[str] = ("rgb", "depth", "semseg"),
            num_classes: int = 133,
            input_size: int = 224,
            semseg_stride: int = 4,
            crop_scale: Sequence[float] = (0.2, 1.0),
            hflip: float = 0.5,
            batch_size: int = 32,
            num_workers: int = 0,
            pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.train_dir, self.val_dir = train_dir, val_dir
        self.synthetic = dict(synthetic) if synthetic is not None else None
        self.modalities = tuple(modalities)
        self.num_classes = num_classes
        self.input_size = input_size
        self.semseg_stride = semseg_stride
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_set: MultiModalFolder | None = None
        self.val_set: MultiModalFolder | None = None
        # Set by the AtteNT teacher; None means plain shuffling over the whole train split.
        self.train_sampler: Sampler[int] | None = None

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            ensure_synthetic_dataset(self.root, **self.synthetic)

    def _transform(self, *, train: bool) -> MultiModalTransform:
        return MultiModalTransform(
            input_size=self.input_size,
            train=train,
            scale=self.crop_scale,
            hflip=self.hflip,
            semseg_stride=self.semseg_stride,
        )

    def _folder(self, split: str, *, train_transform: bool) -> MultiModalFolder:
        return MultiModalFolder(
            self.root / split, modalities=self.modalities, transform=self._transform(train=train_transform)
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._folder(self.train_dir, train_transform=True)
            self.val_set = self._folder(self.val_dir, train_transform=False)
            log.info(
                "data: %d train / %d val samples, %d classes, modalities %s",
                len(self.train_set),
                len(self.val_set),
                len(self.train_set.classes),
                list(self.modalities),
            )

    def scoring_dataset(self, *, train_transform: bool = False) -> Dataset:
        """The train split with evaluation transforms (deterministic), for scoring every training sample."""
        return self._folder(self.train_dir, train_transform=train_transform)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_sampler is not None:
            return self._loader(self.train_set, sampler=self.train_sampler, drop_last=True)
        return self._loader(self.train_set, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
