"""Writing the synthetic dataset to disk in the MultiMAE folder layout, and reusing it while its parameters match."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .render import MAX_DEPTH_M, render_scene
from .scenes import IMAGE_CLASSES, OBJECT_CLASSES, SEMSEG_CLASSES

__all__ = [
    "GENERATOR_VERSION",
    "MODALITY_FOLDERS",
    "SPLITS",
    "ensure_synthetic_dataset",
    "generate_split",
    "generation_lock",
    "load_difficulty",
    "locked_generation",
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


@contextlib.contextmanager
def generation_lock(root: str | Path) -> Iterator[None]:
    """An exclusive lock beside ``root``: processes that start together (DDP ranks, sweep jobs) generate it once."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def locked_generation(generate: Callable[..., Path]) -> Callable[..., Path]:
    """Runs a dataset generator ``generate(root, ...)`` under :func:`generation_lock`."""

    @functools.wraps(generate)
    def wrapper(root: str | Path, *args: Any, **kwargs: Any) -> Path:
        with generation_lock(root):
            return generate(root, *args, **kwargs)

    return wrapper


@locked_generation
def ensure_synthetic_dataset(
    root: str | Path,
    *,
    num_train: int = 512,
    num_val: int = 128,
    image_size: int = 80,
    max_objects: int = 6,
    seed: int = 0,
    num_workers: int = 0,
) -> Path:
    """Generates the synthetic dataset into `root` unless an identical one is already there.

    The dataset is regenerated (its old train/, val/ and meta.json deleted first) when the parameters or the
    generator version differ, or when meta.json is missing or incomplete, e.g. after an interrupted run: meta.json is
    written last. Processes that call it at once take turns (a lock file beside `root`).

    Args:
        root: Output folder; receives train/, val/ and meta.json.
        num_train: Training images.
        num_val: Validation images.
        image_size: Image side in pixels.
        max_objects: Maximum objects per scene, at most the number of object classes (each object has its own class).
        seed: Dataset seed; every sample is seeded by (seed, split, index).
        num_workers: Worker processes for generation; does not change the output.

    Returns:
        `root` as a Path.

    Raises:
        ValueError: An argument is out of range.
        FileExistsError: `root` holds train/ or val/ folders that this generator did not write.
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
    if _reusable(root, expected):
        log.info("Reusing synthetic dataset at %s (%d train + %d val images)", root, num_train, num_val)
        return root

    # Only ever delete what this generator wrote: its meta.json, its in-progress marker or its difficulty files.
    ours = any(
        (root / name).exists() for name in (_META, _IN_PROGRESS, *(f"{s}/difficulty.json" for s in SPLITS))
    )
    if not ours and any((root / split).exists() for split in SPLITS):
        raise FileExistsError(
            f"{root} already holds train/ or val/ without a synthetic meta.json; refusing to overwrite it. "
            "Choose an empty folder."
        )
    for split in SPLITS:
        shutil.rmtree(root / split, ignore_errors=True)
    (root / _META).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
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
                max_objects=max_objects,
                seed=seed,
                num_workers=num_workers,
                progress=progress,
            )
    meta = {
        **expected,
        "generator": "attent_vision.data.synthetic",
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
