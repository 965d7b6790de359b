"""Converts public datasets into the on-disk layouts that `MultiModalFolder` reads.

`nyuv2` — NYU Depth V2 (labeled subset) for downstream fine-tuning. Inputs are the official files:
`nyu_depth_v2_labeled.mat` (MATLAB v7.3, i.e. HDF5, read with h5py), `splits.mat` (`trainNdxs` / `testNdxs`,
1-based) and `classMapping40.mat` (`mapClass`: 894 original ids -> 40 classes, `className`). Output:

    OUT/{train,test}/rgb/data/NNNN.png      8-bit RGB
    OUT/{train,test}/depth/data/NNNN.png    16-bit grey, round(metres * 65536 / 10) clipped to [0, 65535]; 0 = invalid
    OUT/{train,test}/semseg/data/NNNN.png   8-bit palette ('P') image whose indices are the 40-class ids, 0 = unlabeled
    OUT/meta.json                           sources, counts, class names, encodings; written last (marks completion)

NNNN is the 0-based index of the image in the labeled file, zero-padded to 4 digits; "data" is the single class
folder. Everything is validated before the first file is written.

`imagenet_s50` — the MultiMAE multi-task pretraining layout from an ImageNet-S50 image folder
(`IMAGES/<class>/<stem>.JPEG`, classes = sorted subfolders) and pseudo-label folders
(`DEPTH/<class>/<stem>.png` 16-bit, `SEMSEG/<class>/<stem>.png` 8-bit ids). Files are matched by `<class>/<stem>`,
never by sorted position (the reference's pairing bug). Output:

    OUT/<split>/rgb/<class>/<stem>.JPEG       symlink (default), hard link or copy of the source image
    OUT/<split>/depth/<class>/<stem>.png
    OUT/<split>/semseg/<class>/<stem>.png
    OUT/<split>/missing_labels.txt            one line per image left out: "<class>/<file><TAB><missing labels>"
    OUT/<split>/prepare_report.json           counts, missing labels, labels without an image, bad label files

Images lacking depth or semseg are left out, so the output pairs exactly. Symlinks are absolute and cost no space,
but break when the sources move; use `--link copy` for a self-contained tree.

Usage: `python -m attent_vision.data.prepare {nyuv2,imagenet_s50} --help`.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .modalities import DataFormatError, is_image_file

__all__ = [
    "LINK_MODES",
    "NYU_DEPTH_SCALE",
    "encode_nyu_depth",
    "main",
    "prepare_imagenet_s50",
    "prepare_nyuv2",
]

log = logging.getLogger(__name__)

# PNG units per metre: the reference's 65536 / 10 encoding, so 1 unit = 10 m / 2**16 ≈ 0.15 mm.
NYU_DEPTH_SCALE: float = 65536 / 10
NYU_SPLIT_KEYS: dict[str, str] = {"train": "trainNdxs", "test": "testNdxs"}
MODALITY_DIRS: tuple[str, ...] = ("rgb", "depth", "semseg")
LINK_MODES: tuple[str, ...] = ("symlink", "hardlink", "copy")

# Header-level mode checks, mirroring modalities.read_depth / read_semseg without decoding pixels.
_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_SEMSEG_MODES = ("L", "P")
_MAX_LISTED = 10
# Labels are scanned in blocks of this many images, to bound memory on the 1449 x 640 x 480 array.
_LABEL_SCAN_BLOCK = 64


# --------------------------------------------------------------------------------------------------- shared helpers


def _require_file(path: Path, what: str) -> None:
    """Raises DataFormatError when an input file is missing."""
    if not path.is_file():
        raise DataFormatError(f"{path}: {what} not found" + (" (it is a directory)" if path.is_dir() else ""))


def _guard_output(dirs: Iterable[Path], overwrite: bool) -> list[Path]:
    """Refuses to mix a new conversion with files of an earlier one; returns the folders to clear.

    Stale files left beside new ones would silently join the dataset, so a non-empty output needs `overwrite`.
    """
    occupied = [d for d in dirs if d.is_dir() and any(d.iterdir())]
    if occupied and not overwrite:
        raise FileExistsError(
            f"output folders already hold files: {', '.join(map(str, occupied))}; pass --overwrite to replace them"
        )
    return occupied


def _clear(dirs: Iterable[Path]) -> None:
    """Removes earlier output folders (symlinks inside are unlinked, never followed)."""
    for folder in dirs:
        shutil.rmtree(folder)


def _listed(items: Sequence[str], limit: int = _MAX_LISTED) -> str:
    """Joins up to `limit` items one per line, summarising the rest."""
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return "\n".join(f"  {item}" for item in items[:limit]) + more


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Writes JSON through a temporary file, so that a crash never leaves half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------------------- NYUv2


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
    _require_file(path, what)
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
    stale = _guard_output((out / split / m for split in NYU_SPLIT_KEYS for m in MODALITY_DIRS), overwrite)

    _require_file(labeled, "labeled file")
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

    _clear(stale)
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
    _write_json(out / "meta.json", meta)
    return {**meta, "elapsed_s": round(time.perf_counter() - start, 3)}


# ----------------------------------------------------------------------------------------------------- ImageNet-S50


def _scan_tree(root: Path, classes: Sequence[str] | None = None) -> dict[str, Path]:
    """Maps "<class>/<sub/dirs>/<stem>" to the image file, for image files inside class folders of `root`.

    Args:
        root: Folder of class folders.
        classes: When given, only these class folders are scanned; otherwise every non-hidden subfolder.
    """
    if classes is None:
        # Hidden folders are skipped, as MultiModalFolder does (torchvision's find_classes would count them).
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files: dict[str, Path] = {}
    for name in classes:
        class_dir = root / name
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = Path(dirpath).relative_to(root)
            for filename in sorted(filenames):
                if filename.startswith(".") or not is_image_file(filename):
                    continue
                key = (rel_dir / Path(filename).stem).as_posix()
                path = Path(dirpath) / filename
                if key in files:
                    raise DataFormatError(
                        f"{files[key]} and {path} have the same stem; keep one file per stem"
                    )
                files[key] = path
    return files


def _header_problem(
    path: Path, modes: Sequence[str] | None, size: tuple[int, int] | None
) -> tuple[str | None, tuple[int, int] | None]:
    """Reads only an image header and checks it.

    Args:
        path: Image file.
        modes: Accepted Pillow modes; None accepts any 8-bit mode (what `read_rgb` converts to RGB).
        size: Required (width, height), or None.

    Returns:
        (problem or None, (width, height) or None when unreadable).
    """
    try:
        with Image.open(path) as image:
            mode, image_size = image.mode, image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"cannot read image header ({exc})", None
    if modes is None and (mode.startswith("I") or mode == "F"):
        return f"mode {mode!r} is 16-bit or float, expected an 8-bit colour image", image_size
    if modes is not None and mode not in modes:
        return f"mode {mode!r}, expected one of {list(modes)}", image_size
    if size is not None and image_size != size:
        return (
            f"size {image_size[0]}x{image_size[1]} differs from the image's {size[0]}x{size[1]} (WxH)",
            image_size,
        )
    return None, image_size


def _place(source: Path, target: Path, link: str) -> None:
    """Creates `target` as a symlink, hard link or copy of `source`."""
    if link == "symlink":
        target.symlink_to(source.absolute())
    elif link == "hardlink":
        try:
            os.link(source, target)
        except OSError as exc:
            raise OSError(
                f"cannot hard-link {source} to {target} ({exc}); use --link symlink or copy"
            ) from exc
    else:
        shutil.copyfile(source, target)


def prepare_imagenet_s50(
    images: str | os.PathLike[str],
    depth: str | os.PathLike[str],
    semseg: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    split: str = "train",
    link: str = "symlink",
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Assembles `OUT/<split>/{rgb,depth,semseg}/<class>/<stem>.<ext>` from images and pseudo labels.

    Args:
        images: ImageFolder-style `<class>/<stem>.JPEG` tree; classes are its sorted subfolders.
        depth: `<class>/<stem>.png` 16-bit depth pseudo labels.
        semseg: `<class>/<stem>.png` 8-bit class-id pseudo labels.
        out: Output root.
        split: Name of the output split folder.
        link: "symlink" (default: instant, no space, absolute links), "hardlink" (same filesystem only) or "copy".
        skip_bad: Leave out samples with a bad label file instead of raising.
        overwrite: Replace the rgb/depth/semseg folders of an earlier run instead of refusing.
        progress: Show progress bars.

    Returns:
        The contents of `OUT/<split>/prepare_report.json` plus "elapsed_s".

    Raises:
        DataFormatError: An input folder is missing or empty, two files share a stem, or (without `skip_bad`) a
            label file has the wrong mode or size; the report is still written, the output folders are not.
        FileExistsError: The output already holds files and `overwrite` is False.
    """
    start = time.perf_counter()
    if link not in LINK_MODES:
        raise ValueError(f"link must be one of {LINK_MODES}, got {link!r}")
    roots = {"rgb": Path(images), "depth": Path(depth), "semseg": Path(semseg)}
    split_dir = Path(out) / split
    stale = _guard_output((split_dir / m for m in MODALITY_DIRS), overwrite)
    for name, root in roots.items():
        if not root.is_dir():
            raise DataFormatError(f"{root}: {name} folder not found")

    files = {"rgb": _scan_tree(roots["rgb"])}
    classes = sorted({key.split("/", 1)[0] for key in files["rgb"]})
    if not files["rgb"]:
        raise DataFormatError(f"{roots['rgb']}: no image files in class folders (<class>/<stem>.JPEG)")
    for name in ("depth", "semseg"):
        files[name] = _scan_tree(roots[name])

    missing: list[dict[str, Any]] = []
    complete: list[str] = []
    for key, path in files["rgb"].items():
        lacking = [name for name in ("depth", "semseg") if key not in files[name]]
        if lacking:
            missing.append({"image": path.relative_to(roots["rgb"]).as_posix(), "missing": lacking})
        else:
            complete.append(key)
    orphans = {
        name: [
            files[name][key].relative_to(roots[name]).as_posix()
            for key in files[name]
            if key not in files["rgb"]
        ]
        for name in ("depth", "semseg")
    }

    bad: list[dict[str, str]] = []
    bad_keys: set[str] = set()
    allowed = {"rgb": None, "depth": _DEPTH_MODES, "semseg": _SEMSEG_MODES}
    for key in tqdm(complete, desc="check labels", unit="img", disable=not progress):
        # The image header gives the size that the labels must match (MultiModalFolder rejects a mismatch later).
        problem, size = _header_problem(files["rgb"][key], None, None)
        entries = [("rgb", problem)]
        if problem is None:
            entries += [
                (name, _header_problem(files[name][key], allowed[name], size)[0])
                for name in ("depth", "semseg")
            ]
        for name, issue in entries:
            if issue is not None:
                bad.append({"file": str(files[name][key]), "modality": name, "problem": issue})
                bad_keys.add(key)

    def report(written: int) -> dict[str, Any]:
        return {
            "dataset": "imagenet_s50",
            "split": split,
            "source": {name: str(root.resolve()) for name, root in roots.items()},
            "link": link,
            "counts": {
                "classes": len(classes),
                "images": len(files["rgb"]),
                "depth_files": len(files["depth"]),
                "semseg_files": len(files["semseg"]),
                "missing_labels": len(missing),
                "orphan_labels": sum(map(len, orphans.values())),
                "bad_samples": len(bad_keys),
                "written": written,
            },
            "classes": classes,
            "missing_labels": missing,
            "orphan_labels": orphans,
            "bad": bad,
        }

    split_dir.mkdir(parents=True, exist_ok=True)
    if missing:
        lines = [f"{item['image']}\t{','.join(item['missing'])}" for item in missing]
        log.warning(
            "%d image(s) lack labels and are left out (see %s):\n%s",
            len(missing),
            split_dir / "missing_labels.txt",
            _listed(lines, 5),
        )
    if any(orphans.values()):
        found = [f"{name}/{path}" for name, paths in orphans.items() for path in paths]
        log.warning("%d label file(s) have no image:\n%s", len(found), _listed(found, 5))
    (split_dir / "missing_labels.txt").write_text(
        "".join(f"{item['image']}\t{','.join(item['missing'])}\n" for item in missing)
    )
    if bad and not skip_bad:
        _write_json(split_dir / "prepare_report.json", report(0))
        described = [f"{item['file']}: {item['problem']}" for item in bad]
        raise DataFormatError(
            f"{len(bad)} bad file(s) ({len(bad_keys)} sample(s)); pass --skip-bad to leave them out:\n"
            + "\n".join(f"  {line}" for line in described)
        )
    if bad:
        log.warning("%d sample(s) with bad files are left out (--skip-bad)", len(bad_keys))

    _clear(stale)
    written = [key for key in complete if key not in bad_keys]
    for key in tqdm(written, desc=f"{link} {split}", unit="img", disable=not progress):
        for name in MODALITY_DIRS:
            source = files[name][key]
            target = split_dir / name / source.relative_to(roots[name])
            target.parent.mkdir(parents=True, exist_ok=True)
            _place(source, target, link)
    result = report(len(written))
    _write_json(split_dir / "prepare_report.json", result)
    return {**result, "elapsed_s": round(time.perf_counter() - start, 3)}


# ---------------------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    """Builds the `python -m attent_vision.data.prepare` argument parser."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m attent_vision.data.prepare", description=__doc__, formatter_class=formatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{nyuv2,imagenet_s50}")

    nyu = commands.add_parser(
        "nyuv2",
        help="NYU Depth V2 labeled set -> OUT/{train,test}/{rgb,depth,semseg}/data/NNNN.png",
        description=(
            "Converts the official NYU Depth V2 files into OUT/{train,test}/{rgb,depth,semseg}/data/NNNN.png "
            "(NNNN = 0-based index) and OUT/meta.json.\n"
            "depth: uint16 = round(metres * 65536 / 10), clipped to [0, 65535], 0 = invalid.\n"
            "semseg: palette PNG of the 40-class ids, 0 = unlabeled."
        ),
        formatter_class=formatter,
    )
    nyu.add_argument(
        "--labeled", required=True, type=Path, help="nyu_depth_v2_labeled.mat (MATLAB v7.3 / HDF5)"
    )
    nyu.add_argument(
        "--splits", required=True, type=Path, help="splits.mat with 1-based trainNdxs and testNdxs"
    )
    nyu.add_argument(
        "--mapping", required=True, type=Path, help="classMapping40.mat with mapClass and className"
    )
    nyu.add_argument("--out", required=True, type=Path, help="output root")
    nyu.add_argument(
        "--workers", type=int, default=0, help="worker processes for PNG encoding (default 0: none)"
    )
    nyu.add_argument("--overwrite", action="store_true", help="replace the output of an earlier conversion")
    nyu.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    ims = commands.add_parser(
        "imagenet_s50",
        help="ImageNet-S50 images + pseudo labels -> OUT/<split>/{rgb,depth,semseg}/<class>/<stem>.<ext>",
        description=(
            "Assembles the MultiMAE pretraining layout OUT/<split>/{rgb,depth,semseg}/<class>/<stem>.<ext>, "
            "matching images and labels by <class>/<stem>.\n"
            "Images without depth or semseg are left out and listed in OUT/<split>/missing_labels.txt; "
            "counts, labels without an image and bad label files go to OUT/<split>/prepare_report.json."
        ),
        formatter_class=formatter,
    )
    ims.add_argument("--images", required=True, type=Path, help="image folder: <class>/<stem>.JPEG")
    ims.add_argument(
        "--depth", required=True, type=Path, help="depth pseudo labels: <class>/<stem>.png (16-bit)"
    )
    ims.add_argument(
        "--semseg", required=True, type=Path, help="semseg pseudo labels: <class>/<stem>.png (8-bit ids)"
    )
    ims.add_argument("--out", required=True, type=Path, help="output root")
    ims.add_argument("--split", default="train", help="output split folder name (default: train)")
    ims.add_argument(
        "--link",
        choices=LINK_MODES,
        default="symlink",
        help="symlink (default; instant, absolute links that break if the sources move), "
        "hardlink (same filesystem only) or copy (self-contained)",
    )
    ims.add_argument(
        "--skip-bad", action="store_true", help="leave out samples with bad label files instead of failing"
    )
    ims.add_argument("--overwrite", action="store_true", help="replace the output of an earlier run")
    ims.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (1 with an `error:` line for bad inputs)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.command == "nyuv2":
            summary = prepare_nyuv2(
                args.labeled,
                args.splits,
                args.mapping,
                args.out,
                workers=args.workers,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
            counts = ", ".join(f"{split} {count}" for split, count in summary["counts"].items())
            print(f"nyuv2: wrote {counts} images to {args.out} in {summary['elapsed_s']:.2f} s")
        else:
            summary = prepare_imagenet_s50(
                args.images,
                args.depth,
                args.semseg,
                args.out,
                split=args.split,
                link=args.link,
                skip_bad=args.skip_bad,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
            counts = summary["counts"]
            print(
                f"imagenet_s50: {counts['written']} of {counts['images']} images written ({args.link}) to "
                f"{args.out / args.split}; {counts['missing_labels']} lack labels, {counts['orphan_labels']} labels "
                f"lack an image, {counts['bad_samples']} bad; {summary['elapsed_s']:.2f} s"
            )
    except (DataFormatError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
