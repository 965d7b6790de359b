"""Embedded downstream data: procedural scenes written in the real downstream datasets' on-disk formats.

The fine-tuning tasks read exactly what they read on real data, so the default run exercises the real loading path:

    root/cls/{train,val}/<class>/<stem>.png                  ImageNet-S50 classification layout (ImageFolder);
                                                             the class is the scene's largest object
    root/nyu/{train,test}/{rgb,depth,semseg}/data/NNNN.png   the layout `prepare nyuv2` writes: depth uint16 =
                                                             metres x 65536 / 10 (0 = no reading), semseg uint8 ids
                                                             1..8 with 0 = unlabeled
    root/<kind>/meta.json                                    written last; marks a complete dataset
    root/<kind>/.attent/                                     the generator's marker and lock (`roots`)

Scenes come from the pretraining generator (`render.render_scene`) with their own seed and split codes, so no
downstream image is a pretraining image (tests/test_finetune_data.py checks that). Like the real NYUv2, the depth maps
have holes (no reading beyond the sensor range) and the label maps leave object boundaries unlabeled, so the ignore
and valid-pixel paths of the losses and metrics are exercised by default.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from ..constants import NYU_DEPTH_SCALE
from .render import MAX_DEPTH_M, render_scene
from .roots import RootOwner, claimed_root, read_json
from .scenes import IMAGE_CLASSES, SEMSEG_CLASSES

__all__ = [
    "NYU_DEPTH_SCALE",
    "ensure_classification_scenes",
    "ensure_nyu_like_scenes",
    "nyu_semseg_classes",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
# NYUv2 as `prepare nyuv2` (and the MultiMAE preparation) writes it: uint16 = metres x 65536 / 10.
# Split codes mixed into every sample's seed; the pretraining generator uses 0 (train) and 1 (val).
_SPLIT_CODE = {("cls", "train"): 10, ("cls", "val"): 11, ("nyu", "train"): 20, ("nyu", "test"): 21}
_META = "meta.json"


def nyu_semseg_classes() -> list[str]:
    """Names of the label ids 1..K of the NYU-like set (0 is unlabeled)."""
    return list(SEMSEG_CLASSES)


def _scene(seed: int, kind: str, split: str, index: int, image_size: int, max_objects: int) -> Any:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[(kind, split)], index]))
    return render_scene(rng, image_size=image_size, max_objects=max_objects)


def _reusable(root: Path, expected: dict[str, Any]) -> bool:
    meta = read_json(root / _META)
    return meta is not None and all(meta.get(key) == value for key, value in expected.items())


def _owner(kind: str, splits: tuple[str, ...], advice: str) -> RootOwner:
    """The generator of one kind: recognises its own older sets (meta.json) and real datasets (split folders)."""

    def legacy(root: Path) -> bool:
        meta = read_json(root / _META)
        return meta is not None and meta.get("kind") == kind and "generator_version" in meta

    def foreign(root: Path) -> str | None:
        found = [split for split in splits if (root / split).is_dir()]
        if not found:
            return None
        return (
            f"holds {'/, '.join(found)}/ that the embedded {kind} generator did not write; refusing to write into "
            f"it: fine-tune on it with data.synthetic=null data.root={root} ({advice})"
        )

    return RootOwner(kind=kind, legacy=legacy, foreign=foreign)


CLASSIFICATION_OWNER = _owner(
    "classification", ("train", "val"), "experiment=ft_imagenet_s50_cls for ImageNet-S50"
)
NYU_LIKE_OWNER = _owner(
    "nyu_like", ("train", "test"), "experiment=ft_nyuv2_semseg or ft_nyuv2_depth for a prepared NYUv2"
)


def _reset(root: Path, splits: tuple[str, ...]) -> None:
    """Deletes what this generator wrote before (the root is claimed: it holds nothing else)."""
    for split in splits:
        shutil.rmtree(root / split, ignore_errors=True)
    (root / _META).unlink(missing_ok=True)


def _write_meta(root: Path, meta: dict[str, Any]) -> None:
    tmp = root / f"{_META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, root / _META)


def ensure_classification_scenes(
    root: str | Path,
    *,
    num_train: int = 768,
    num_eval: int = 384,
    image_size: int = 80,
    max_objects: int = 4,
    seed: int = 2026,
    create: bool | str = True,
    data_dir: str | Path | None = None,
) -> Path:
    """Writes (or reuses) the scene-classification set in the ImageNet-S50 folder layout.

    Args:
        root: Output folder; receives train/<class>/, val/<class>/ and meta.json.
        num_train: Training images.
        num_eval: Evaluation images (the val split).
        image_size: Image side in pixels.
        max_objects: Maximum objects per scene.
        seed: Dataset seed (the pretraining data uses its own seed and split codes).
        create: Whether a missing `root` is created: True, False, or "auto" (only inside `data_dir`).
        data_dir: ``paths.data_dir``, where "auto" creates a missing root.

    Returns:
        `root` as a Path.

    Raises:
        ConfigError: `root` is missing and may not be created, or cannot be written.
        DataRootError: `root` holds files this generator did not write; nothing is written.
    """
    root = Path(root)
    params = dict(
        num_train=num_train, num_eval=num_eval, image_size=image_size, max_objects=max_objects, seed=seed
    )
    expected = {"generator_version": GENERATOR_VERSION, "kind": "classification", "params": params}
    if _reusable(root, expected):  # before any write or lock: a complete set is reused wherever it lies
        return root
    with claimed_root(root, owner=CLASSIFICATION_OWNER, create=create, data_dir=data_dir):
        if not _reusable(root, expected):
            _write_classification(root, expected)
    return root


def _write_classification(root: Path, expected: dict[str, Any]) -> None:
    num_train, num_eval = expected["params"]["num_train"], expected["params"]["num_eval"]
    seed, image_size, max_objects = (expected["params"][k] for k in ("seed", "image_size", "max_objects"))
    _reset(root, ("train", "val"))
    start = time.perf_counter()
    counts: dict[str, dict[str, int]] = {}
    with tqdm(total=num_train + num_eval, desc="downstream cls scenes", unit="img", leave=False) as bar:
        for split, num in (("train", num_train), ("val", num_eval)):
            for name in IMAGE_CLASSES:  # every class folder in every split: identical class numbering
                (root / split / name).mkdir(parents=True, exist_ok=True)
            tally: Counter[str] = Counter()
            for index in range(num):
                scene = _scene(seed, "cls", split, index, image_size, max_objects)
                Image.fromarray(scene.rgb).save(root / split / scene.class_name / f"{index:06d}.png")
                tally[scene.class_name] += 1
                bar.update(1)
            counts[split] = {name: tally[name] for name in IMAGE_CLASSES}
    _write_meta(root, {**expected, "classes": list(IMAGE_CLASSES), "counts": counts})
    log.info(
        "Generated %d + %d classification scenes in %.1f s", num_train, num_eval, time.perf_counter() - start
    )


def _unlabel_boundaries(labels: np.ndarray) -> np.ndarray:
    """0 (unlabeled) wherever a pixel's 3x3 neighbourhood holds another class, as NYUv2 leaves edges unlabeled."""
    grown = ndimage.maximum_filter(labels, size=3, mode="nearest")
    shrunk = ndimage.minimum_filter(labels, size=3, mode="nearest")
    return np.where(grown == shrunk, labels, 0).astype(np.uint8)


def ensure_nyu_like_scenes(
    root: str | Path,
    *,
    num_train: int = 512,
    num_eval: int = 256,
    image_size: int = 80,
    max_objects: int = 6,
    sensor_range_m: float = 8.0,
    seed: int = 2026,
    create: bool | str = True,
    data_dir: str | Path | None = None,
) -> Path:
    """Writes (or reuses) the segmentation + metric-depth set in the prepared NYUv2 layout.

    Args:
        root: Output folder; receives {train,test}/{rgb,depth,semseg}/data/NNNN.png and meta.json.
        num_train: Training images.
        num_eval: Evaluation images (the test split).
        image_size: Image side in pixels.
        max_objects: Maximum objects per scene.
        sensor_range_m: Depth beyond this range reads 0 (no measurement), like a structured-light sensor.
        seed: Dataset seed.
        create: Whether a missing `root` is created: True, False, or "auto" (only inside `data_dir`).
        data_dir: ``paths.data_dir``, where "auto" creates a missing root.

    Returns:
        `root` as a Path.

    Raises:
        ValueError: `sensor_range_m` is out of range.
        ConfigError: `root` is missing and may not be created, or cannot be written.
        DataRootError: `root` holds files this generator did not write; nothing is written.
    """
    root = Path(root)
    if not 0 < sensor_range_m <= 10.0:
        raise ValueError(
            f"sensor_range_m must be in (0, 10] (the uint16 encoding spans 10 m), got {sensor_range_m}"
        )
    params = dict(
        num_train=num_train,
        num_eval=num_eval,
        image_size=image_size,
        max_objects=max_objects,
        sensor_range_m=sensor_range_m,
        seed=seed,
    )
    expected = {"generator_version": GENERATOR_VERSION, "kind": "nyu_like", "params": params}
    if _reusable(root, expected):  # before any write or lock: a complete set is reused wherever it lies
        return root
    with claimed_root(root, owner=NYU_LIKE_OWNER, create=create, data_dir=data_dir):
        if not _reusable(root, expected):
            _write_nyu_like(root, expected)
    return root


def _write_nyu_like(root: Path, expected: dict[str, Any]) -> None:
    params = expected["params"]
    num_train, num_eval, sensor_range_m = params["num_train"], params["num_eval"], params["sensor_range_m"]
    seed, image_size, max_objects = params["seed"], params["image_size"], params["max_objects"]
    _reset(root, ("train", "test"))
    start = time.perf_counter()
    with tqdm(total=num_train + num_eval, desc="downstream nyu-like scenes", unit="img", leave=False) as bar:
        for split, num in (("train", num_train), ("test", num_eval)):
            folders = {m: root / split / m / "data" for m in ("rgb", "depth", "semseg")}
            for folder in folders.values():
                folder.mkdir(parents=True, exist_ok=True)
            for index in range(num):
                scene = _scene(seed, "nyu", split, index, image_size, max_objects)
                metres = scene.depth.astype(np.float64) / 65535.0 * MAX_DEPTH_M
                depth = np.rint(np.clip(metres, 0.0, 10.0) * NYU_DEPTH_SCALE).clip(0, 65535).astype(np.uint16)
                depth[metres > sensor_range_m] = 0
                labels = _unlabel_boundaries(scene.semseg.astype(np.uint8) + 1)
                stem = f"{index:04d}.png"
                Image.fromarray(scene.rgb).save(folders["rgb"] / stem)
                Image.fromarray(depth).save(folders["depth"] / stem)
                Image.fromarray(labels).save(folders["semseg"] / stem)
                bar.update(1)
    meta = {
        **expected,
        # The same keys as the meta.json of `prepare nyuv2`.
        "depth": {
            "encoding": "uint16 = metres x 65536 / 10; 0 = no reading",
            "units_per_metre": NYU_DEPTH_SCALE,
        },
        "semseg": {
            "encoding": "pixel value = class id, 0 = unlabeled, k = class_names[k - 1]",
            "num_classes": len(nyu_semseg_classes()),
            "class_names": nyu_semseg_classes(),
        },
        "counts": {"train": num_train, "test": num_eval},
    }
    _write_meta(root, meta)
    log.info("Generated %d + %d NYU-like scenes in %.1f s", num_train, num_eval, time.perf_counter() - start)
