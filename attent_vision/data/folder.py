"""The MultiMAE multi-modal folder dataset, with samples paired by file stem across modalities."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .modalities import DEFAULT_MODALITIES, DataFormatError, get_modality, image_size, is_image_file
from .transforms import to_tensors

__all__ = ["MultiModalFolder"]

# How many missing files an error message lists before summarising the rest.
_MAX_LISTED = 10


def _scan_modality(modality_dir: Path) -> dict[str, Path]:
    """Maps "<class>/<sub/dirs>/<stem>" (posix, no extension) to the image file, for every class folder."""
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(modality_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(modality_dir)
        if rel_dir == Path("."):
            continue  # files directly under root/<modality>/ belong to no class
        for name in filenames:
            if name.startswith(".") or not is_image_file(name):
                continue
            key = (rel_dir / Path(name).stem).as_posix()
            path = Path(dirpath) / name
            if key in files:
                raise DataFormatError(f"{files[key]} and {path} have the same stem; keep one file per stem")
            files[key] = path
    return files


class MultiModalFolder(Dataset):
    """Images at `root/<modality>/<class>/<stem>.<ext>`, one sample per stem present in every modality.

    Unlike the MultiMAE reference code (which pairs each modality's sorted file lists by position, so one missing
    file shifts every later pair), files are matched by their path relative to the modality folder without
    extension, so `rgb/cat/001.jpg` pairs with `depth/cat/001.png`. A stem missing from any modality is an error,
    never a silent shift.

    Args:
        root: Dataset root holding one folder per modality.
        modalities: Modality names, each a registered reader (see `modalities.MODALITIES`). Classes are the sorted
            subfolders of the first one.
        transform: Called with {modality: PIL image or numpy array}; returns {modality: tensor}. When None, items
            hold raw tensors (see `transforms.to_tensors`).

    Items are dicts of the transformed modalities plus "index" (int64, the dataset index) and "label" (int64 class).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        modalities: Sequence[str] = DEFAULT_MODALITIES,
        transform: Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        if isinstance(modalities, str) or not modalities:
            raise ValueError(f"modalities must be a non-empty sequence of names, got {modalities!r}")
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities contain duplicates: {list(modalities)}")
        self.root = Path(root)
        self.modalities = tuple(modalities)
        self.transform = transform
        self._readers = {name: get_modality(name).reader for name in self.modalities}

        for name in self.modalities:
            if not (self.root / name).is_dir():
                raise DataFormatError(
                    f"{self.root / name} is missing: expected one folder per modality under {root}"
                )
        first_dir = self.root / self.modalities[0]
        # Not torchvision's find_classes: it counts hidden folders (.ipynb_checkpoints, .cache) as classes, which
        # shifts every later label and gives classes without samples, since _scan_modality skips hidden folders.
        self.classes: list[str] = sorted(
            entry.name for entry in os.scandir(first_dir) if entry.is_dir() and not entry.name.startswith(".")
        )
        if not self.classes:
            raise DataFormatError(f"{first_dir} has no class folders")
        self.class_to_idx: dict[str, int] = {name: i for i, name in enumerate(self.classes)}

        files = {name: _scan_modality(self.root / name) for name in self.modalities}
        self._check_complete(files)
        keys = files[self.modalities[0]]
        if not keys:
            raise DataFormatError(f"{first_dir} has no image files in its class folders")

        # Sorted by (class index, path within the class), i.e. the order of a sorted directory walk.
        ordered = sorted(keys, key=lambda key: (self.class_to_idx[key.split("/", 1)[0]], key))
        self.samples: list[tuple[str, int]] = [
            (key, self.class_to_idx[key.split("/", 1)[0]]) for key in ordered
        ]
        self.targets: list[int] = [label for _, label in self.samples]
        # Paths kept as str: a list of small str tuples is cheap to share with DataLoader workers.
        self._paths: list[tuple[str, ...]] = [
            tuple(str(files[m][key]) for m in self.modalities) for key in ordered
        ]

    def _check_complete(self, files: Mapping[str, Mapping[str, Path]]) -> None:
        """Raises naming the files that one modality has and another lacks."""
        problems: list[str] = []
        all_keys = sorted(set().union(*(set(f) for f in files.values())))
        for key in all_keys:
            holder = next(m for m in self.modalities if key in files[m])
            for name in self.modalities:
                if key not in files[name]:
                    expected = self.root / name / f"{key}.{get_modality(name).extension}"
                    problems.append(f"{expected} is missing ({holder} has {files[holder][key]})")
        if problems:
            more = f"\n... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
            raise DataFormatError(
                f"{len(problems)} file(s) do not pair across modalities {list(self.modalities)} under {self.root}:\n"
                + "\n".join(problems[:_MAX_LISTED])
                + more
            )

    def __len__(self) -> int:
        return len(self.samples)

    def sample_paths(self, index: int) -> dict[str, Path]:
        """The file of each modality for sample `index`."""
        return {name: Path(path) for name, path in zip(self.modalities, self._paths[index], strict=True)}

    def load(self, index: int) -> dict[str, Any]:
        """Reads the raw modalities of one sample and checks that they share one height and width."""
        raw = {name: self._readers[name](path) for name, path in zip(self.modalities, self._paths[index])}
        sizes = {name: image_size(value) for name, value in raw.items()}
        if len(set(sizes.values())) > 1:
            described = ", ".join(
                f"{path} is {sizes[name][0]}x{sizes[name][1]}"
                for name, path in zip(self.modalities, self._paths[index])
            )
            raise DataFormatError(
                f"modalities of sample {self.samples[index][0]!r} differ in size (HxW): {described}"
            )
        return raw

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        index = index % len(self)
        raw = self.load(index)
        item = dict(self.transform(raw) if self.transform is not None else to_tensors(raw))
        item["index"] = torch.tensor(index, dtype=torch.int64)
        item["label"] = torch.tensor(self.samples[index][1], dtype=torch.int64)
        return item

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, modalities={list(self.modalities)}, "
            f"samples={len(self)}, classes={len(self.classes)}, transform={self.transform!r})"
        )
