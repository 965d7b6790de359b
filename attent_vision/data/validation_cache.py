"""The data check's cache: which files passed, keyed by size and modification time, so that a restart re-reads only
what changed. One JSON file per split root, written atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["CACHE_NAME", "all_ints", "cache_file", "load_cache", "validation_cache_dir", "write_cache"]

log = logging.getLogger(__name__)

CACHE_NAME = ".attent_validated.json"
_CACHE_VERSION = 1


def cache_file(root: Path, cache_dir: Path | None, fallback_dir: Path | None = None) -> Path:
    """The cache of a split root.

    Under ``cache_dir`` when given; else inside the split root when it is writable; else under ``fallback_dir``
    (the entry points pass ``<paths.data_dir>/.attent/validated``, so that they write nothing outside their data
    directory), or the user cache (``$XDG_CACHE_HOME``, default ~/.cache) without one.
    """
    if cache_dir is None and os.access(root, os.W_OK):
        return root / CACHE_NAME
    if cache_dir is None:
        cache_dir = fallback_dir
    if cache_dir is None:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        cache_dir = base / "attent_vision" / "validated"
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{root.name}-{digest}.json"


def validation_cache_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """Where the data check of a read-only split caches: ``<data_dir>/.attent/validated`` (None without one)."""
    return None if data_dir is None else Path(data_dir) / ".attent" / "validated"


def load_cache(path: Path) -> dict[str, Any]:
    """The cache's contents; an empty cache when it is missing, unreadable or of another version."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") == _CACHE_VERSION and isinstance(data.get("sections"), dict):
            return data
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError) as error:  # corrupt or foreign: start over
        log.warning("ignoring unreadable data check cache %s (%s)", path, error)
    return {"version": _CACHE_VERSION, "sections": {}}


def all_ints(values: list[Any]) -> bool:
    """Whether a cache entry holds plain ints only (JSON from elsewhere may not)."""
    return all(type(value) is int for value in values)


def write_cache(path: Path, data: dict[str, Any]) -> bool:
    """Writes the cache atomically; False (with a warning) when it cannot be written."""
    # tmp + rename: a concurrent reader (another rank, another job) sees the old or the new file, never half of one.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as stream:
                json.dump(data, stream, separators=(",", ":"))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as error:
        log.warning(
            "cannot write the data check cache %s (%s); the next start re-checks every file", path, error
        )
        return False
    return True
