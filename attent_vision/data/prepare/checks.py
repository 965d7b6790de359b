"""What every converter shares: input and output checks, listings and atomic JSON reports."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..modalities import DataFormatError

MODALITY_DIRS: tuple[str, ...] = ("rgb", "depth", "semseg")
_MAX_LISTED = 10


def require_file(path: Path, what: str) -> None:
    """Raises DataFormatError when an input file is missing."""
    if not path.is_file():
        raise DataFormatError(f"{path}: {what} not found" + (" (it is a directory)" if path.is_dir() else ""))


def guard_output(dirs: Iterable[Path], overwrite: bool) -> list[Path]:
    """Refuses to mix a new conversion with files of an earlier one; returns the folders to clear.

    Stale files left beside new ones would silently join the dataset, so a non-empty output needs `overwrite`.
    """
    occupied = [d for d in dirs if d.is_dir() and any(d.iterdir())]
    if occupied and not overwrite:
        raise FileExistsError(
            f"output folders already hold files: {', '.join(map(str, occupied))}; pass --overwrite to replace them"
        )
    return occupied


def clear(dirs: Iterable[Path]) -> None:
    """Removes earlier output folders (symlinks inside are unlinked, never followed)."""
    for folder in dirs:
        shutil.rmtree(folder)


def listed(items: Sequence[str], limit: int = _MAX_LISTED) -> str:
    """Joins up to `limit` items one per line, summarising the rest."""
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return "\n".join(f"  {item}" for item in items[:limit]) + more


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Writes JSON through a temporary file, so that a crash never leaves half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
