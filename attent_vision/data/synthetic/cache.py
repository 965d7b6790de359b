"""Writing the synthetic dataset to disk in the MultiMAE folder layout, and reusing it while its parameters match."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..modalities import MODALITIES as MODALITY_NAMES
from .render import MAX_DEPTH_M, render_scene
from .roots import GENERATOR_NAME, RootOwner, claimed_root, generation_lock, read_json
from .scenes import IMAGE_CLASSES, OBJECT_CLASSES, SEMSEG_CLASSES

__all__ = [
    "GENERATOR_VERSION",
    "MODALITY_FOLDERS",
    "SPLITS",
    "ensure_synthetic_dataset",
    "generate_split",
    "generation_lock",
    "load_difficulty",
]

log = logging.getLogger(__name__)

# Bump whenever the rendered bytes change, so that cached datasets are regenerated.
GENERATOR_VERSION = 1

SPLITS = ("train", "val")
MODALITY_FOLDERS = ("rgb", "depth", "semseg")
_SEED_SPLIT_ID = {"train": 0, "val": 1}


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Each sample has its own stream, so bytes do not depend on generation order or worker count."""
    return np.random.default_rng(np.random.SeedSequence([seed, _SEED_SPLIT_ID[split], index]))


def _write_sample(job: tuple[Path, str, int, int, int, int]) -> tuple[str, str, dict[str, Any]]:
    split_dir, split, index, seed, image_size, max_objects = job
    scene = render_scene(_sample_rng(seed, split, index), image_size=image_size, max_objects=max_objects)
    stem = f"{index:06d}"
    images = {
        "rgb": Image.fromarray(scene.rgb),
        "depth": Image.fromarray(scene.depth),  # uint16 → mode I;16 → 16-bit greyscale PNG
        "semseg": Image.fromarray(scene.semseg),
    }
    for modality, image in images.items():
        image.save(split_dir / modality / scene.class_name / f"{stem}.png", compress_level=1)
    return stem, scene.class_name, scene.factors


def generate_split(
    split_dir: str | Path,
    *,
    split: str,
    num_samples: int,
    image_size: int,
    max_objects: int,
    seed: int,
    num_workers: int = 0,
    progress: tqdm | None = None,
) -> dict[str, int]:
    """Renders one split into `split_dir` and writes its difficulty.json.

    Args:
        split_dir: Output folder (receives rgb/, depth/, semseg/ and difficulty.json).
        split: "train" or "val"; part of every sample's seed.
        num_samples: Number of images.
        image_size: Side in pixels.
        max_objects: Maximum number of objects per scene.
        seed: Dataset seed.
        num_workers: Worker processes (0 renders in this process); the output does not depend on it.
        progress: Optional progress bar advanced once per image.

    Returns:
        Number of images per image-level class.
    """
    split_dir = Path(split_dir)
    # Every class folder exists in every split, so that train and val number their classes identically.
    for modality in MODALITY_FOLDERS:
        for class_name in IMAGE_CLASSES:
            (split_dir / modality / class_name).mkdir(parents=True, exist_ok=True)
    jobs = [(split_dir, split, index, seed, image_size, max_objects) for index in range(num_samples)]
    results: Iterator[tuple[str, str, dict[str, Any]]]
    counts: Counter[str] = Counter()
    difficulty: dict[str, dict[str, Any]] = {}
    with _worker_pool(num_workers) as pool:
        results = pool.map(_write_sample, jobs, chunksize=8) if pool else map(_write_sample, jobs)
        for stem, class_name, factors in results:
            counts[class_name] += 1
            difficulty[stem] = {"class": class_name, **factors}
            if progress is not None:
                progress.update(1)
    (split_dir / "difficulty.json").write_text(json.dumps(difficulty, indent=1, sort_keys=True) + "\n")
    return {name: counts[name] for name in IMAGE_CLASSES}


@contextlib.contextmanager
def _worker_pool(num_workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """A process pool, or None when num_workers is 0."""
    if num_workers == 0:
        yield None
        return
    # fork avoids re-importing torch in every worker; rendering uses numpy and Pillow only.
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    )
    with ProcessPoolExecutor(num_workers, mp_context=context) as executor:
        yield executor


def load_difficulty(split_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Reads `<split_dir>/difficulty.json`: {stem: {factors..., "difficulty": float}}.

    The stem is the file name without extension; MultiModalFolder sample keys are "<class>/<stem>".
    """
    return json.loads((Path(split_dir) / "difficulty.json").read_text())


_META = "meta.json"
_IN_PROGRESS = ".generating"


def _count_images(split_dir: Path, modality: str) -> int:
    return sum(len(files) for _, _, files in os.walk(split_dir / modality))


def _reusable(root: Path, expected: dict[str, Any]) -> bool:
    """Whether root holds a complete dataset written with exactly these parameters and this generator version."""
    try:
        meta = json.loads((root / _META).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or any(meta.get(key) != value for key, value in expected.items()):
        return False
    if (root / _IN_PROGRESS).exists() or "counts" not in meta:
        return False
    for split in SPLITS:
        wanted = expected["params"][f"num_{split}"]
        if any(_count_images(root / split, modality) != wanted for modality in MODALITY_FOLDERS):
            return False
    return True


def _legacy_set(root: Path) -> bool:
    """A set this generator wrote before roots were marked: its meta.json, or the marker of an interrupted run."""
    meta = read_json(root / _META)
    return (meta is not None and meta.get("generator") == GENERATOR_NAME) or (root / _IN_PROGRESS).is_file()


def _multitask_advice(root: Path) -> str | None:
    """How to train on a real multi-task dataset (``<split>/<modality>/...``) found where the generator would write."""
    modalities = set(MODALITY_NAMES)
    for split in root.iterdir():
        if (
            split.is_dir()
            and not split.name.startswith(".")
            and any((split / m).is_dir() for m in modalities)
        ):
            return (
                "holds a multi-task dataset (<split>/<modality>/<class>/<stem>.<ext>), not the synthetic one; "
                f"refusing to write into it: train on it with data=multitask_folder data.root={root}"
            )
    return None


PRETRAIN_OWNER = RootOwner(kind="pretrain", legacy=_legacy_set, foreign=_multitask_advice)


def ensure_synthetic_dataset(
    root: str | Path,
    *,
    num_train: int = 512,
    num_val: int = 128,
    image_size: int = 80,
    max_objects: int = 6,
    seed: int = 0,
    num_workers: int = 0,
    create: bool | str = True,
    data_dir: str | Path | None = None,
    root_key: str = "data.root",
) -> Path:
    """Generates the synthetic dataset into `root` unless an identical one is already there.

    A complete identical set is reused wherever it lies, without writing anything (a read-only copy works). Else
    `root` must be new (and allowed to be created), empty, or hold a set this generator wrote (see
    `attent_vision.data.synthetic.roots`); the set is then regenerated, its old train/, val/ and meta.json deleted
    first, e.g. after an interrupted run (meta.json is written last). Processes that call it at once take turns
    (the lock `<root>/.attent/generate.lock`).

    Args:
        root: Output folder; receives train/, val/ and meta.json.
        num_train: Training images.
        num_val: Validation images.
        image_size: Image side in pixels.
        max_objects: Maximum objects per scene, at most the number of object classes (each object has its own class).
        seed: Dataset seed; every sample is seeded by (seed, split, index).
        num_workers: Worker processes for generation; does not change the output.
        create: Whether a missing `root` is created: True, False, or "auto" (only inside `data_dir`; the configs'
            ``data.synthetic.create``).
        data_dir: ``paths.data_dir``, where "auto" creates a missing root.
        root_key: The setting that named `root`, for the messages.

    Returns:
        `root` as a Path.

    Raises:
        ValueError: An argument is out of range.
        ConfigError: `root` is missing and may not be created, or cannot be written.
        DataRootError: `root` holds files this generator did not write (a real dataset: the message says how to
            train on it); nothing is written. Also a FileExistsError.
    """
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train} and {num_val}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    if not 1 <= max_objects <= len(OBJECT_CLASSES):
        raise ValueError(
            f"max_objects must be in [1, {len(OBJECT_CLASSES)}] (one object per class), got {max_objects}"
        )
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    root = Path(root)
    params = {
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "max_objects": max_objects,
        "seed": seed,
    }
    expected = {"generator_version": GENERATOR_VERSION, "params": params}
    if _reusable(root, expected):  # before any write or lock: a complete set is reused wherever it lies
        log.info("Reusing synthetic dataset at %s (%d train + %d val images)", root, num_train, num_val)
        return root
    with claimed_root(root, owner=PRETRAIN_OWNER, create=create, data_dir=data_dir, key=root_key):
        if _reusable(root, expected):  # another process generated it while this one waited for the lock
            log.info("Reusing synthetic dataset at %s (%d train + %d val images)", root, num_train, num_val)
            return root
        return _generate(root, expected, num_workers=num_workers)


def _generate(root: Path, expected: dict[str, Any], *, num_workers: int) -> Path:
    """Writes the set into a claimed and locked `root`, replacing what this generator wrote there before."""
    params = expected["params"]
    num_train, num_val, image_size = params["num_train"], params["num_val"], params["image_size"]
    for split in SPLITS:
        shutil.rmtree(root / split, ignore_errors=True)
    (root / _META).unlink(missing_ok=True)
    (root / _IN_PROGRESS).write_text(json.dumps(expected) + "\n")

    start = time.perf_counter()
    counts: dict[str, dict[str, int]] = {}
    with tqdm(total=num_train + num_val, desc="synthetic scenes", unit="img", leave=False) as progress:
        for split, num in (("train", num_train), ("val", num_val)):
            counts[split] = generate_split(
                root / split,
                split=split,
                num_samples=num,
                image_size=image_size,
                max_objects=params["max_objects"],
                seed=params["seed"],
                num_workers=num_workers,
                progress=progress,
            )
    meta = {
        **expected,
        "generator": GENERATOR_NAME,
        "semseg_classes": list(SEMSEG_CLASSES),
        "image_classes": list(IMAGE_CLASSES),
        "max_depth_m": MAX_DEPTH_M,
        "depth_encoding": "uint16 = depth_m / max_depth_m * 65535 (z-depth along the optical axis)",
        "counts": counts,
    }
    tmp = root / f"{_META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, root / _META)
    (root / _IN_PROGRESS).unlink()
    log.info(
        "Generated synthetic dataset at %s (%d train + %d val images, %dpx) in %.1f s",
        root,
        num_train,
        num_val,
        image_size,
        time.perf_counter() - start,
    )
    return root
