"""`imagenet_s50` — the MultiMAE multi-task pretraining layout from an ImageNet-S50 image folder
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
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..modalities import DataFormatError, is_image_file
from .checks import (
    MODALITY_DIRS,
    clear,
    guard_output,
    listed,
    write_json,
)

log = logging.getLogger(__name__)

LINK_MODES: tuple[str, ...] = ("symlink", "hardlink", "copy")
# Header-level mode checks, mirroring modalities.read_depth / read_semseg without decoding pixels.
_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_SEMSEG_MODES = ("L", "P")


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
    stale = guard_output((split_dir / m for m in MODALITY_DIRS), overwrite)
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
            listed(lines, 5),
        )
    if any(orphans.values()):
        found = [f"{name}/{path}" for name, paths in orphans.items() for path in paths]
        log.warning("%d label file(s) have no image:\n%s", len(found), listed(found, 5))
    (split_dir / "missing_labels.txt").write_text(
        "".join(f"{item['image']}\t{','.join(item['missing'])}\n" for item in missing)
    )
    if bad and not skip_bad:
        write_json(split_dir / "prepare_report.json", report(0))
        described = [f"{item['file']}: {item['problem']}" for item in bad]
        raise DataFormatError(
            f"{len(bad)} bad file(s) ({len(bad_keys)} sample(s)); pass --skip-bad to leave them out:\n"
            + "\n".join(f"  {line}" for line in described)
        )
    if bad:
        log.warning("%d sample(s) with bad files are left out (--skip-bad)", len(bad_keys))

    clear(stale)
    written = [key for key in complete if key not in bad_keys]
    for key in tqdm(written, desc=f"{link} {split}", unit="img", disable=not progress):
        for name in MODALITY_DIRS:
            source = files[name][key]
            target = split_dir / name / source.relative_to(roots[name])
            target.parent.mkdir(parents=True, exist_ok=True)
            _place(source, target, link)
    result = report(len(written))
    write_json(split_dir / "prepare_report.json", result)
    return {**result, "elapsed_s": round(time.perf_counter() - start, 3)}
