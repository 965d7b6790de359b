"""Pretrained weights by name or URL: the original MultiMAE release's files (``multimae-b``, ``mae-b`` and their
``-timm`` variants) and any http(s) checkpoint, downloaded once into torch.hub's cache.

The download is torch.hub's own (:func:`torch.hub.download_url_to_file`: a progress bar, a temporary file moved
into place only when complete and, when the file name carries one, the sha256 prefix checked first, ``HASH_REGEX``),
so a failed or corrupt download leaves nothing in the cache. As with :func:`torch.hub.load_state_dict_from_url`,
a file already in the cache is used as is. ``ATTENT_WEIGHTS_MIRROR`` replaces the release's base URL (a cluster's
local mirror).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlparse

import torch.hub

__all__ = [
    "MIRROR_ENV",
    "RELEASED_WEIGHTS",
    "RELEASE_BASE_URL",
    "RELEASE_LICENCE",
    "ReleasedWeights",
    "WeightsDownloadError",
    "fetch_weights",
    "is_remote",
    "is_url",
    "release_url",
    "weights_cache_dir",
]

log = logging.getLogger(__name__)

RELEASE_BASE_URL = "https://github.com/EPFL-VILAB/MultiMAE/releases/download/pretrained-weights"
MIRROR_ENV = "ATTENT_WEIGHTS_MIRROR"
RELEASE_LICENCE = "CC-BY-NC 4.0 (non-commercial)"
RELEASE_PROJECT = "https://github.com/EPFL-VILAB/MultiMAE"
LOCAL_FILE_HINT = "pass a local file: pretrained=/path/to/file.pth"


@dataclass(frozen=True)
class ReleasedWeights:
    """One file of the MultiMAE release (EPFL-VILAB/MultiMAE, README "Pre-trained models").

    Attributes:
        name: What ``pretrained=`` takes.
        file: The release's file name; its last ``-<hex>`` is the sha256 prefix torch.hub checks.
        inputs: The input adapters the file holds (``timm`` files: the RGB path only).
        layout: ``multivit`` (MultiMAE keys under ``model``) or ``timm`` (timm ViT keys under ``model``).
        description: One line for the docs and the log.
    """

    name: str
    file: str
    inputs: tuple[str, ...]
    layout: str
    description: str


RELEASED_WEIGHTS: dict[str, ReleasedWeights] = {
    w.name: w
    for w in (
        ReleasedWeights(
            name="multimae-b",
            file="multimae-b_98_rgb+-depth-semseg_1600e_multivit-afff3f8c.pth",
            inputs=("rgb", "depth", "semseg"),
            layout="multivit",
            description="MultiMAE-B, RGB + depth + semseg, 1600 epochs",
        ),
        ReleasedWeights(
            name="multimae-b-timm",
            file="multimae-b_98_rgb+-depth-semseg_1600e_timm-bafa5499.pth",
            inputs=("rgb",),
            layout="timm",
            description="MultiMAE-B's RGB encoder as timm ViT-B/16 keys",
        ),
        ReleasedWeights(
            name="mae-b",
            file="mae-b_dec512d8b_1600e_multivit-c477195b.pth",
            inputs=("rgb",),
            layout="multivit",
            description="MAE-B (RGB only), 1600 epochs",
        ),
        ReleasedWeights(
            name="mae-b-timm",
            file="mae-b_dec512d8b_1600e_timm-f74f3a8d.pth",
            inputs=("rgb",),
            layout="timm",
            description="MAE-B as timm ViT-B/16 keys",
        ),
    )
}


class WeightsDownloadError(OSError):
    """Weights named by a release name or URL could not be brought into the cache (offline, HTTP error, hash)."""


def is_url(source: object) -> bool:
    """Whether ``source`` is an http(s) URL."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def is_remote(source: object) -> bool:
    """Whether ``source`` names weights to download: a released name or an http(s) URL."""
    return is_url(source) or (isinstance(source, str) and source in RELEASED_WEIGHTS)


def release_url(weights: ReleasedWeights) -> str:
    """The download URL of a released file: the release's, or the mirror's when ``ATTENT_WEIGHTS_MIRROR`` is set."""
    base = os.environ.get(MIRROR_ENV) or RELEASE_BASE_URL
    return f"{base.rstrip('/')}/{weights.file}"


def weights_cache_dir() -> Path:
    """torch.hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the cache folder: the ranks of a DDP job download a file once, not once each. The lock
    is on the folder itself, so the cache holds nothing but checkpoints."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _download(url: str, target: Path, *, progress: bool, released: bool) -> None:
    match = torch.hub.HASH_REGEX.search(target.name)
    hash_prefix = match.group(1) if match else None
    log.info("Downloading %s to %s", url, target)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=hash_prefix, progress=progress)
    except RuntimeError as error:
        if "invalid hash value" not in str(error):
            raise
        raise WeightsDownloadError(
            f"{url}: the download fails the sha256 check of its file name ({error}): the download is corrupt or "
            f"the server sent another file; nothing was kept in {target.parent}"
        ) from None
    except (OSError, HTTPException) as error:
        mirror_hint = f", or set {MIRROR_ENV} to a mirror of {RELEASE_BASE_URL}" if released else ""
        if isinstance(error, HTTPError):
            reason = f"HTTP {error.code} {error.reason}"
        else:
            reason = str(error.reason if isinstance(error, URLError) else error)
        raise WeightsDownloadError(
            f"cannot download {url} ({reason}) and no copy is cached at {target}: without internet access, "
            f"download the file elsewhere and {LOCAL_FILE_HINT} (or copy it to that cache path){mirror_hint}"
        ) from None


def fetch_weights(source: str, *, progress: bool = True) -> Path:
    """The cached file of a released name or a URL, downloaded on first use.

    The cache file is named after the URL's last path segment, as torch.hub names it, so a mirror and the
    release share one cached copy.

    Args:
        source: A key of :data:`RELEASED_WEIGHTS` or an http(s) URL.
        progress: Show torch.hub's progress bar on stderr.

    Returns:
        The file in :func:`weights_cache_dir`.

    Raises:
        WeightsDownloadError: Not cached and the download fails (with the URL and how to pass a local file), or the
            download fails the hash check its file name carries.
        ValueError: ``source`` is neither a released name nor a URL, or the URL names no file.
    """
    released = RELEASED_WEIGHTS.get(source)
    if released is None and not is_url(source):
        raise ValueError(
            f"{source!r} is neither a released name ({', '.join(RELEASED_WEIGHTS)}) nor an http(s) URL"
        )
    url = release_url(released) if released else source
    file_name = released.file if released else unquote(Path(urlparse(url).path).name)
    if not file_name:
        raise ValueError(f"{url}: the URL names no file (it should end in the checkpoint's file name)")
    target = weights_cache_dir() / file_name
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent):
        cached = target.is_file()
        if not cached:
            _download(url, target, progress=progress, released=released is not None)
    how = "cached" if cached else "downloaded"
    if released:
        log.info(
            "pretrained weights %s (%s): %s, %s at %s; licence: %s, %s",
            released.name,
            released.description,
            url,
            how,
            target,
            RELEASE_LICENCE,
            RELEASE_PROJECT,
        )
    else:
        log.info("pretrained weights %s, %s at %s", url, how, target)
    return target
