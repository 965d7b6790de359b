"""`nyuv2` — NYU Depth V2 (labeled subset) for downstream fine-tuning. Inputs are the official files:
`nyu_depth_v2_labeled.mat` (MATLAB v7.3, i.e. HDF5, read with h5py), `splits.mat` (`trainNdxs` / `testNdxs`,
1-based) and `classMapping40.mat` (`mapClass`: 894 original ids -> 40 classes, `className`). Output:

    OUT/{train,test}/rgb/data/NNNN.png      8-bit RGB
    OUT/{train,test}/depth/data/NNNN.png    16-bit grey, round(metres * 65536 / 10) clipped to [0, 65535]; 0 = invalid
    OUT/{train,test}/semseg/data/NNNN.png   8-bit palette ('P') image whose indices are the 40-class ids, 0 = unlabeled
    OUT/meta.json                           sources, counts, class names, encodings; written last (marks completion)

NNNN is the 0-based index of the image in the labeled file, zero-padded to 4 digits; "data" is the single class
folder. Everything is validated before the first file is written.
"""

from __future__ import annotations

import colorsys
import logging
import multiprocessing
import os
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..constants import NYU_DEPTH_SCALE
from ..modalities import DataFormatError
from .checks import (
    MODALITY_DIRS,
    clear,
    guard_output,
    require_file,
    write_json,
)

log = logging.getLogger(__name__)

NYU_SPLIT_KEYS: dict[str, str] = {"train": "trainNdxs", "test": "testNdxs"}
# Labels are scanned in blocks of this many images, to bound memory on the 1449 x 640 x 480 array.
_LABEL_SCAN_BLOCK = 64


def encode_nyu_depth(metres: np.ndarray) -> np.ndarray:
    """Encodes depth in metres as uint16 PNG units.

    Args:
        metres: Float depth array.

    Returns:
        uint16 array of round(metres * 65536 / 10) clipped to [0, 65535] (the reference wrapped to 0 at exactly
        10 m); NaN, infinite and negative depths become 0, the invalid value.
    """
    metres = np.asarray(metres, dtype=np.float64)
    valid = np.isfinite(metres) & (metres > 0)
    units = np.rint(np.where(valid, metres, 0.0) * NYU_DEPTH_SCALE)
    return np.clip(units, 0, np.iinfo(np.uint16).max).astype(np.uint16)


def _label_palette(num_ids: int) -> list[int]:
    """A flat 256-colour palette: id 0 black, then well-separated hues (golden-ratio steps) for viewing."""
    palette = [0, 0, 0]
    for i in range(1, 256):
        if i >= num_ids:
            palette += [0, 0, 0]
            continue
        red, green, blue = colorsys.hsv_to_rgb(
            (i * 0.618033988749895) % 1.0, 0.55 + 0.45 * (i % 2), 0.95 - 0.35 * (i // 2 % 2)
        )
        palette += [round(255 * red), round(255 * green), round(255 * blue)]
    return palette


def _import_mat_readers() -> tuple[Any, Any]:
    """Imports h5py and scipy.io, which only the NYUv2 conversion needs."""
    try:
        import h5py
        import scipy.io
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"prepare nyuv2 needs h5py and scipy ({exc}); install them with `pip install h5py scipy`"
        ) from exc
    return h5py, scipy.io


def _load_mat_v5(path: Path, what: str) -> dict[str, Any]:
    """Loads a MATLAB v5/v7 .mat file with scipy, without its `__header__`-style entries."""
    h5py, scipy_io = _import_mat_readers()
    require_file(path, what)
    if h5py.is_hdf5(path):
        raise DataFormatError(
            f"{path}: is a MATLAB v7.3 (HDF5) file; the {what} is expected as the official MATLAB v5 .mat "
            "(re-save it in MATLAB with `save(..., '-v7')`)"
        )
    try:
        data = scipy_io.loadmat(path)
    except (ValueError, TypeError, NotImplementedError, OSError, scipy_io.matlab.MatReadError) as exc:
        raise DataFormatError(f"{path}: not a readable MATLAB .mat file ({exc})") from exc
    return {key: value for key, value in data.items() if not key.startswith("__")}


def _mat_key(data: Mapping[str, Any], key: str, path: Path) -> np.ndarray:
    """Returns one variable of a loaded .mat file, naming the variables it has when `key` is missing."""
    if key not in data:
        raise DataFormatError(f"{path}: missing variable {key!r}; the file holds {sorted(data)}")
    return np.asarray(data[key])


def _integral(values: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Flattens a numeric MATLAB array (MATLAB stores indices as double) into int64, rejecting fractions."""
    flat = np.asarray(values).ravel()
    if flat.size == 0:
        raise DataFormatError(f"{path}: {key} is empty")
    if not (np.issubdtype(flat.dtype, np.integer) or np.issubdtype(flat.dtype, np.floating)):
        raise DataFormatError(f"{path}: {key} must be numeric, got dtype {flat.dtype}")
    if np.issubdtype(flat.dtype, np.floating):
        bad = ~np.isfinite(flat) | (flat != np.round(flat))
        if bad.any():
            raise DataFormatError(f"{path}: {key} holds non-integer value {flat[bad][0]!r}")
    return flat.astype(np.int64)


def _split_indices(
    data: Mapping[str, Any], key: str, path: Path, num_images: int, labeled: Path
) -> np.ndarray:
    """Reads one 1-based split index vector and returns it 0-based, checking range and duplicates."""
    ones_based = _integral(_mat_key(data, key, path), key, path)
    outside = ones_based[(ones_based < 1) | (ones_based > num_images)]
    if outside.size:
        raise DataFormatError(
            f"{path}: {key} holds index {outside[0]} ({outside.size} out of range in all), outside [1, {num_images}] "
            f"for the {num_images} images of {labeled} (indices are 1-based)"
        )
    values, counts = np.unique(ones_based, return_counts=True)
    if (counts > 1).any():
        raise DataFormatError(f"{path}: {key} lists index {values[counts > 1][0]} more than once")
    return ones_based - 1


def _class_names(data: Mapping[str, Any], path: Path) -> list[str]:
    """Reads `className`, a MATLAB cell array of strings (scipy gives an object array of 1-element arrays)."""
    names: list[str] = []
    for cell in _mat_key(data, "className", path).ravel():
        value = np.asarray(cell).ravel()
        if value.size != 1 or not isinstance(value[0], str):
            raise DataFormatError(f"{path}: className must be a cell array of strings, found entry {cell!r}")
        names.append(str(value[0]))
    if not names:
        raise DataFormatError(f"{path}: className is empty")
    return names


def _h5_dataset(h5: Any, key: str, path: Path) -> Any:
    """Returns one HDF5 dataset, naming the keys the file has when it is missing."""
    import h5py

    if key not in h5:
        raise DataFormatError(f"{path}: missing dataset {key!r}; the file holds {sorted(h5.keys())}")
    node = h5[key]
    if not isinstance(node, h5py.Dataset):
        raise DataFormatError(f"{path}: {key!r} is a {type(node).__name__}, expected an array dataset")
    return node


def _check_nyu_arrays(h5: Any, path: Path) -> tuple[int, int, int]:
    """Checks the shapes and dtypes of images / depths / labels; returns (N, height, width)."""
    images = _h5_dataset(h5, "images", path)
    depths = _h5_dataset(h5, "depths", path)
    labels = _h5_dataset(h5, "labels", path)
    # MATLAB stores column-major, so h5py sees each H x W x ... array with its axes reversed.
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
        raise DataFormatError(
            f"{path}: images has shape {images.shape} and dtype {images.dtype}; expected (N, 3, W, H) uint8 "
            "(MATLAB's H x W x 3 x N array as h5py shows it)"
        )
    num, _, width, height = images.shape
    if num == 0:
        raise DataFormatError(f"{path}: images holds no images")
    if depths.shape != (num, width, height) or depths.dtype.kind != "f":
        raise DataFormatError(
            f"{path}: depths has shape {depths.shape} and dtype {depths.dtype}; expected ({num}, {width}, {height}) "
            "floating-point metres to match images"
        )
    if labels.shape != (num, width, height) or labels.dtype.kind not in "ui":
        raise DataFormatError(
            f"{path}: labels has shape {labels.shape} and dtype {labels.dtype}; expected ({num}, {width}, {height}) "
            "integer class ids to match images"
        )
    return num, height, width


def _check_label_ids(labels: Any, path: Path, map_len: int, mapping: Path) -> None:
    """Scans the labels for ids the mapping cannot translate (negative or above len(mapClass))."""
    for start in range(0, labels.shape[0], _LABEL_SCAN_BLOCK):
        block = labels[start : start + _LABEL_SCAN_BLOCK].reshape(-1, labels.shape[1] * labels.shape[2])
        too_high = np.flatnonzero(block.max(axis=1) > map_len)
        if too_high.size:
            index = start + int(too_high[0])
            raise DataFormatError(
                f"{path}: labels of image {index} (0-based) hold original class id {int(block[too_high[0]].max())}, "
                f"but mapClass in {mapping} has only {map_len} entries"
            )
        if labels.dtype.kind == "i" and block.min() < 0:
            raise DataFormatError(f"{path}: labels hold negative class ids")


# Per-process state of the conversion: the open HDF5 file and the id lookup table (set by _init_nyu_worker).
_NYU_STATE: dict[str, Any] = {}


def _init_nyu_worker(labeled: str, lut: np.ndarray, palette: list[int]) -> None:
    """Opens the labeled file once per process; h5py handles cannot cross a process boundary."""
    import h5py

    _NYU_STATE.update(file=h5py.File(labeled, "r"), lut=lut, palette=palette)


def _close_nyu_state() -> None:
    """Closes the file opened by _init_nyu_worker in this process."""
    handle = _NYU_STATE.pop("file", None)
    if handle is not None:
        handle.close()
    _NYU_STATE.clear()


def _convert_nyu_image(job: tuple[int, str]) -> None:
    """Writes the rgb, depth and semseg PNGs of one image into one split folder."""
    index, split_dir = job
    h5, lut = _NYU_STATE["file"], _NYU_STATE["lut"]
    name = f"{index:04d}.png"
    out = Path(split_dir)
    # (3, W, H) -> (H, W, 3): undo MATLAB's column-major axis order.
    rgb = np.ascontiguousarray(h5["images"][index].transpose(2, 1, 0))
    Image.fromarray(rgb).save(out / "rgb" / "data" / name)
    Image.fromarray(encode_nyu_depth(h5["depths"][index].T)).save(out / "depth" / "data" / name)
    semseg = Image.fromarray(np.ascontiguousarray(lut[h5["labels"][index].T]))
    semseg.putpalette(_NYU_STATE["palette"])  # turns the "L" image into "P" with the ids as palette indices
    semseg.save(out / "semseg" / "data" / name)


def prepare_nyuv2(
    labeled: str | os.PathLike[str],
    splits: str | os.PathLike[str],
    mapping: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Converts the official NYU Depth V2 labeled files into `OUT/{train,test}/{rgb,depth,semseg}/data/NNNN.png`.

    Args:
        labeled: `nyu_depth_v2_labeled.mat` (MATLAB v7.3 / HDF5).
        splits: `splits.mat` with 1-based `trainNdxs` and `testNdxs`.
        mapping: `classMapping40.mat` with `mapClass` (original id -> 40-class id) and `className`.
        out: Output root.
        workers: Worker processes for the PNG encoding; 0 converts in this process.
        overwrite: Replace the rgb/depth/semseg folders of an earlier conversion instead of refusing.
        progress: Show a progress bar.

    Returns:
        The contents of `OUT/meta.json` plus "elapsed_s".

    Raises:
        DataFormatError: An input is missing, unreadable, lacks a variable, has the wrong shape, or holds indices
            or ids out of range; raised before anything is written.
        FileExistsError: The output already holds a conversion and `overwrite` is False.
    """
    h5py, _ = _import_mat_readers()
    start = time.perf_counter()
    labeled, splits, mapping, out = Path(labeled), Path(splits), Path(mapping), Path(out)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    stale = guard_output((out / split / m for split in NYU_SPLIT_KEYS for m in MODALITY_DIRS), overwrite)

    require_file(labeled, "labeled file")
    if not h5py.is_hdf5(labeled):
        with labeled.open("rb") as handle:
            v5 = handle.read(10) == b"MATLAB 5.0"
        raise DataFormatError(
            f"{labeled}: "
            + ("is a MATLAB v5 .mat file" if v5 else "is not an HDF5 file")
            + "; expected the MATLAB v7.3 (HDF5) nyu_depth_v2_labeled.mat"
        )
    split_data = _load_mat_v5(splits, "splits file")
    mapping_data = _load_mat_v5(mapping, "class mapping file")
    class_names = _class_names(mapping_data, mapping)
    map_class = _integral(_mat_key(mapping_data, "mapClass", mapping), "mapClass", mapping)
    outside = map_class[(map_class < 0) | (map_class > len(class_names))]
    if outside.size:
        raise DataFormatError(
            f"{mapping}: mapClass maps to class id {outside[0]}, outside [0, {len(class_names)}] "
            f"for the {len(class_names)} names in className"
        )
    # lut[original id] = 40-class id; index 0 (unlabeled) stays 0.
    lut = np.concatenate([[0], map_class]).astype(np.uint8)

    with h5py.File(labeled, "r") as h5:
        num, height, width = _check_nyu_arrays(h5, labeled)
        indices = {
            split: _split_indices(split_data, key, splits, num, labeled)
            for split, key in NYU_SPLIT_KEYS.items()
        }
        overlap = np.intersect1d(indices["train"], indices["test"])
        if overlap.size:
            raise DataFormatError(
                f"{splits}: {overlap.size} image(s) are in both trainNdxs and testNdxs, e.g. index {overlap[0] + 1} "
                "(1-based)"
            )
        _check_label_ids(h5["labels"], labeled, len(map_class), mapping)

    clear(stale)
    jobs: list[tuple[int, str]] = []
    for split, split_indices in indices.items():
        for modality in MODALITY_DIRS:
            (out / split / modality / "data").mkdir(parents=True, exist_ok=True)
        jobs += [(int(index), str(out / split)) for index in split_indices]
    palette = _label_palette(len(class_names) + 1)
    with tqdm(total=len(jobs), desc="nyuv2", unit="img", disable=not progress) as bar:
        if workers == 0:
            _init_nyu_worker(str(labeled), lut, palette)
            try:
                for job in jobs:
                    _convert_nyu_image(job)
                    bar.update()
            finally:
                _close_nyu_state()
        else:
            # fork skips re-importing torch in each worker; no HDF5 file is open in this process at this point.
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ProcessPoolExecutor(
                workers,
                mp_context=context,
                initializer=_init_nyu_worker,
                initargs=(str(labeled), lut, palette),
            ) as pool:
                for _ in pool.map(_convert_nyu_image, jobs, chunksize=8):
                    bar.update()

    meta: dict[str, Any] = {
        "dataset": "nyuv2",
        "source": {
            "labeled": str(labeled.resolve()),
            "splits": str(splits.resolve()),
            "mapping": str(mapping.resolve()),
        },
        "num_images": num,
        "image_size_hw": [height, width],
        "counts": {split: len(split_indices) for split, split_indices in indices.items()},
        "file_names": "NNNN.png, the 0-based index into the labeled file, zero-padded to 4 digits",
        "rgb": {"encoding": "8-bit RGB PNG"},
        "depth": {
            "encoding": "16-bit grey PNG, round(metres * 65536 / 10) clipped to [0, 65535]; 0 = invalid (NaN, <= 0)",
            "units_per_metre": NYU_DEPTH_SCALE,
        },
        "semseg": {
            "encoding": "8-bit palette PNG; pixel value = class id, 0 = unlabeled, k = class_names[k - 1]",
            "num_classes": len(class_names),
            "class_names": class_names,
        },
    }
    write_json(out / "meta.json", meta)
    return {**meta, "elapsed_s": round(time.perf_counter() - start, 3)}
