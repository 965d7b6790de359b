"""LightningDataModule for multi-modal pretraining data in the MultiMAE folder layout."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from attent_vision.data.folder import MultiModalFolder
from attent_vision.data.modalities import DEFAULT_MODALITIES
from attent_vision.data.synthetic import ensure_synthetic_dataset
from attent_vision.data.transforms import MultiModalTransform
from attent_vision.data.validate import ValidationReport, validate_folder
from attent_vision.data.validation_cache import validation_cache_dir
from attent_vision.seeds import item_seed

log = logging.getLogger(__name__)


class EpochTaggedSampler(Sampler):
    """Yields ``(index, epoch)`` from a sampler that has an ``epoch`` (the teacher's), for seeded augmentation."""

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler

    def __iter__(self):
        epoch = getattr(self.sampler, "epoch", 0)
        return ((index, epoch) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class SeededAugmentation(Dataset):
    """Draws each item's random augmentation from the ``augmentation`` seed stream keyed by (seed, epoch, index).

    A sample's crop and flip then depend on neither the loader worker that reads it, nor the rank, nor whether
    the run was resumed: a resumed run sees exactly the augmentations of an uninterrupted one. The stream differs
    from the training masks' (``attent_vision.seeds``), so a sample's crop and its mask are drawn independently.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        # torchvision's random transforms draw from the default CPU generator: seed it for this item and put
        # its state back afterwards (50x cheaper than torch.random.fork_rng + torch.manual_seed).
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(item_seed("augmentation", self.seed, epoch, index=index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


class MultiModalDataModule(pl.LightningDataModule):
    """Train/val loaders over ``<root>/<split>/<modality>/<class>/<stem>.<ext>``.

    Args:
        root: Dataset root holding the split folders.
        train_dir: Train split folder under ``root``.
        val_dir: Validation split folder under ``root``.
        synthetic: Generator parameters; when given, the synthetic scenes are generated into ``root`` on first
            use (and reused afterwards). ``None`` reads an existing dataset. Its ``create`` (``auto``, ``true`` or
            ``false``; true when absent) says whether a missing ``root`` may be created; ``auto`` creates it only
            inside ``data_dir``. A non-empty ``root`` the generator did not write is never written into.
        data_dir: ``paths.data_dir``: where ``create=auto`` creates a missing synthetic root, and where the data
            check caches its results when a split folder is read-only (None: in the user cache, ~/.cache).
        modalities: Modalities to load, in token order.
        num_classes: Semantic classes in the semseg maps (the model's class embedding size).
        input_size: Square crop size fed to the model.
        semseg_stride: Semseg maps are returned at ``input_size / semseg_stride``.
        crop_scale: Area range of the random-resized crop.
        hflip: Probability of the shared horizontal flip.
        batch_size: Per-device batch size.
        num_workers: DataLoader workers per device.
        pin_memory: Pin host memory (useful on GPUs).
        seed: Seeds the loaders' own generators, so building a loader never draws from the global RNG (which
            keeps resumed runs on the same random stream as uninterrupted ones).
    """

    def __init__(
        self,
        *,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        synthetic: dict[str, Any] | None = None,
        data_dir: str | None = None,
        modalities: Sequence[str] = DEFAULT_MODALITIES,
        num_classes: int = 133,
        input_size: int = 224,
        semseg_stride: int = 4,
        crop_scale: Sequence[float] = (0.2, 1.0),
        hflip: float = 0.5,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.train_dir, self.val_dir = train_dir, val_dir
        self.synthetic = dict(synthetic) if synthetic is not None else None
        self.data_dir = None if data_dir is None else Path(data_dir)
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
        self.seed = seed
        # Set by the AtteNT teacher; None means plain shuffling over the whole train split.
        self.train_sampler: Sampler[int] | None = None
        self._train_loader: DataLoader | None = None
        self._val_loader: DataLoader | None = None

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            ensure_synthetic_dataset(self.root, data_dir=self.data_dir, **self.synthetic)

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

    def validate_files(self, *, min_size: int, workers: int | None = None) -> None:
        """Opens every train and val file once, before training, and raises listing every bad one.

        Results are cached by file size and mtime (see `attent_vision.data.validate`), so a restart over the same
        data only stats the files.

        Args:
            min_size: Smallest accepted image side (the encoder's patch size).
            workers: Decoding threads (None: one per CPU, at most 8).

        Raises:
            DataFormatError: Listing each problem (undecodable file, wrong mode or bit depth, sizes differing
                across a sample's modalities, semseg id outside ``num_classes`` and 255, image under a patch).
        """
        self.setup("fit")
        reports = [
            validate_folder(
                split,
                min_size=min_size,
                num_classes=self.num_classes,
                workers=workers,
                fallback_dir=validation_cache_dir(self.data_dir),
            )
            for split in (self.train_set, self.val_set)
        ]
        ValidationReport.combine(reports).raise_if_problems()

    # -- the AtteNT teacher's datamodule contract ----------------------------------------------------------------

    def train_dataset(self) -> MultiModalFolder:
        self.setup("fit")
        return self.train_set

    def set_train_sampler(self, sampler: Sampler[int]) -> None:
        """Train on ``sampler``'s indices; the teacher mutates it in place between epochs."""
        self.train_sampler = sampler
        self._train_loader = None

    def scoring_dataset(self, *, train_transform: bool = False) -> Dataset:
        """The train split with evaluation transforms (deterministic), for scoring every training sample."""
        return self._folder(self.train_dir, train_transform=train_transform)

    def sample_labels(self) -> torch.Tensor:
        """Image-level class of every training sample (int64)."""
        return torch.as_tensor(self.train_dataset().targets, dtype=torch.int64)

    def train_size(self) -> int:
        """Number of training samples, without generating or loading anything when it is known in advance."""
        if self.synthetic is not None:  # exactly what prepare_data() generates or reuses
            return int(self.synthetic.get("num_train", 512))
        return len(self.train_dataset())

    # -- loaders -------------------------------------------------------------------------------------------------

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        # Lightning asks again every epoch (the teacher changes epoch lengths); handing back the same loader keeps
        # its persistent workers alive. The sampler it holds reads the teacher's current pool on every iteration.
        if self._train_loader is None:
            if self.train_sampler is not None:
                self._train_loader = self._loader(
                    SeededAugmentation(self.train_set, self.seed),
                    sampler=EpochTaggedSampler(self.train_sampler),
                    drop_last=True,
                )
            else:
                self._train_loader = self._loader(self.train_set, shuffle=True, drop_last=True)
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        if self._val_loader is None:
            self._val_loader = self._loader(self.val_set, shuffle=False)
        return self._val_loader
