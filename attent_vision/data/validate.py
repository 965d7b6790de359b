"""Up-front data validation: every file of a split is opened once before training, and all problems are listed.

Each file is read with the loader's own reader (so it fails here exactly when it would fail in a DataLoader worker,
hours into a run), then checked for size (at least one patch), class ids (semseg) and, per sample, equal sizes
across modalities. Files are decoded in parallel threads (Pillow releases the GIL while decoding).

Files that pass are remembered in a JSON cache keyed by file size and mtime, so the next start over the same data
only stats the files. The cache lives at ``<split root>/.attent_validated.json`` when the split folder is writable,
else at ``<fallback_dir>/<split name>-<hash of its absolute path>.json`` (the datamodules pass
``<paths.data_dir>/.attent/validated``; without one ``$XDG_CACHE_HOME/attent_vision/validated``), or in
``cache_dir`` when given::

    {"version": 1,
     "sections": {"<check parameters>": {"files": {"<path relative to the split root>": [size, mtime_ns, h, w]}}}}

One section per set of check parameters (min_size, num_classes, ...), so changing them re-checks every file while
two configurations sharing a folder do not evict each other. Height and width are cached so that the cross-modality
size check never re-reads an unchanged file. A cache that cannot be read is ignored (everything is re-checked).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from .constants import SEG_IGNORE_INDEX
from .modalities import DataFormatError, image_size, read_rgb
from .validation_cache import all_ints, cache_file, load_cache, write_cache

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

    from .folder import MultiModalFolder

__all__ = [
    "FileChecks",
    "ValidationReport",
    "clean_worker_error",
    "default_workers",
    "validate_folder",
    "validate_image_folder",
    "validate_samples",
]

log = logging.getLogger(__name__)

Reader = Callable[[str | os.PathLike[str]], Any]

# Sections kept per cache file; older parameter sets are dropped first.
_MAX_SECTIONS = 8
# How many problems an error message lists before summarising the rest.
_MAX_LISTED = 20
# Files per thread-pool task: few enough futures for ImageNet-sized splits, small enough for a smooth progress bar.
_CHUNK = 16


@dataclass(frozen=True)
class FileChecks:
    """What a file must satisfy beyond being readable by its modality's reader.

    Args:
        min_size: Smallest accepted height and width (the encoder's patch size).
        num_classes: Semseg ids must be below this (after ``reduce_zero_label``) or equal ``ignore_index``;
            None skips the id check.
        ignore_index: Semseg id that losses and metrics ignore.
        reduce_zero_label: Stored id 0 means unlabeled and k means class k - 1, so stored ids 0..num_classes are
            valid.
    """

    min_size: int = 1
    num_classes: int | None = None
    ignore_index: int = SEG_IGNORE_INDEX
    reduce_zero_label: bool = False

    def key(self) -> str:
        """Cache section name: any change of a parameter re-checks every file."""
        return (
            f"min_size={self.min_size},num_classes={self.num_classes},ignore_index={self.ignore_index},"
            f"reduce_zero_label={self.reduce_zero_label}"
        )


@dataclass
class ValidationReport:
    """Outcome of validating one or more splits.

    Attributes:
        roots: Split folders that were validated.
        files: Files in the splits.
        checked: Files opened and decoded this time.
        cached: Files skipped because the cache says they passed and their size and mtime are unchanged.
        problems: One ``"<path>: <what is wrong>"`` line per problem, in dataset order.
        seconds: Wall time of the validation.
        cache_files: Where the results were cached (None where no cache could be written).
    """

    roots: list[Path]
    files: int = 0
    checked: int = 0
    cached: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cache_files: list[Path | None] = field(default_factory=list)

    @classmethod
    def combine(cls, reports: Sequence[ValidationReport]) -> ValidationReport:
        """One report for several splits, so that all their problems are raised together."""
        return cls(
            roots=[root for report in reports for root in report.roots],
            files=sum(r.files for r in reports),
            checked=sum(r.checked for r in reports),
            cached=sum(r.cached for r in reports),
            problems=[p for r in reports for p in r.problems],
            seconds=sum(r.seconds for r in reports),
            cache_files=[c for r in reports for c in r.cache_files],
        )

    def raise_if_problems(self) -> None:
        """Raises one DataFormatError listing the problems (the first 20 of them), if there are any."""
        if not self.problems:
            return
        listed = "\n".join(f"  {problem}" for problem in self.problems[:_MAX_LISTED])
        more = (
            f"\n  ... and {len(self.problems) - _MAX_LISTED} more" if len(self.problems) > _MAX_LISTED else ""
        )
        roots = ", ".join(str(root) for root in self.roots)
        raise DataFormatError(
            f"data check found {len(self.problems)} problem(s) in {roots}; training did not start:\n"
            f"{listed}{more}\n"
            "Fix, convert or delete these files (for multi-modal data, with their files in the other modalities) "
            "and start again; files that passed are cached, so the next check reads only new or changed files."
        )


def default_workers() -> int:
    """Decoding threads used when none are asked for: one per CPU, at most 8 (disk-bound beyond that)."""
    return max(1, min(8, os.cpu_count() or 1))


# -- per-file checks ---------------------------------------------------------------------------------------------


@dataclass
class _FileResult:
    size: tuple[int, int] | None  # (height, width) when the file decoded
    problems: list[str]


def _check_file(path: str, modality: str, reader: Reader, checks: FileChecks) -> _FileResult:
    try:
        value = reader(path)
    except DataFormatError as error:
        message = str(error)
        return _FileResult(None, [message if message.startswith(path) else f"{path}: {message}"])
    except FileNotFoundError:
        return _FileResult(None, [f"{path}: file disappeared during the check"])
    except Exception as error:  # any reader failure is a problem to list, not a reason to stop listing
        return _FileResult(None, [f"{path}: cannot read ({type(error).__name__}: {error})"])
    height, width = image_size(value)
    problems: list[str] = []
    if height < checks.min_size or width < checks.min_size:
        problems.append(
            f"{path}: {height}x{width} pixels is smaller than one {checks.min_size}x{checks.min_size} patch"
        )
    if modality == "semseg" and checks.num_classes is not None:
        problems.extend(_check_ids(path, np.asarray(value), checks))
    return _FileResult((height, width), problems)


def _check_ids(path: str, ids: np.ndarray, checks: FileChecks) -> list[str]:
    assert checks.num_classes is not None
    limit = checks.num_classes + int(
        checks.reduce_zero_label
    )  # stored ids 0..limit-1 are classes (or unlabeled)
    present = np.flatnonzero(np.bincount(ids.ravel(), minlength=256))
    bad = [int(i) for i in present if i >= limit and i != checks.ignore_index]
    if not bad:
        return []
    shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
    meaning = f"num_classes={checks.num_classes}" + (", 0 = unlabeled" if checks.reduce_zero_label else "")
    return [
        f"{path}: semseg ids [{shown}] are out of range; expected 0..{limit - 1} ({meaning}) "
        f"or {checks.ignore_index} (ignored)"
    ]


# -- the core ----------------------------------------------------------------------------------------------------


def validate_samples(
    samples: Sequence[Mapping[str, str | os.PathLike[str]]],
    readers: Mapping[str, Reader],
    *,
    root: str | os.PathLike[str],
    checks: FileChecks = FileChecks(),  # frozen, so sharing the default is safe
    workers: int | None = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    fallback_dir: str | os.PathLike[str] | None = None,
) -> ValidationReport:
    """Reads every file of every sample once and lists everything wrong with them.

    Args:
        samples: One ``{modality: path}`` per sample; all modalities of a sample must share one height and width.
        readers: Reader of each modality (raises DataFormatError naming the file when the format is wrong).
        root: Split folder the paths are under (names the cache and keys its entries).
        checks: Size and class-id checks on top of the readers'.
        workers: Decoding threads; 0 reads in this thread, None uses `default_workers()`.
        cache_dir: Folder of the cache file; None uses the split folder if writable, else ``fallback_dir``.
        progress: Show a progress bar (only on a terminal).
        fallback_dir: Folder of the cache when the split folder is read-only (None: the user cache).

    Returns:
        The report; call ``raise_if_problems()`` on it to stop on any problem.
    """
    start = time.perf_counter()
    root = Path(root)
    workers = default_workers() if workers is None else workers
    cache_path = cache_file(
        root,
        None if cache_dir is None else Path(cache_dir),
        None if fallback_dir is None else Path(fallback_dir),
    )
    cache = load_cache(cache_path)
    sections: dict[str, Any] = cache["sections"]
    section_key = checks.key()
    section = sections.get(section_key)
    known: Any = section.get("files") if isinstance(section, dict) else None
    if not isinstance(known, dict):  # a damaged section is as good as none
        known = {}

    def rel(path: str) -> str:
        return os.path.relpath(path, root)

    # Stat everything; only files that are new or whose size / mtime changed are read.
    sizes: list[dict[str, tuple[int, int] | None]] = []
    file_problems: dict[tuple[int, str], list[str]] = {}
    todo: list[tuple[int, str, str, list[int]]] = []  # (sample, modality, path, [size, mtime_ns])
    updated = dict(known)
    total = cached = 0
    for index, sample in enumerate(samples):
        sizes.append({})
        for modality, raw_path in sample.items():
            total += 1
            path = os.fspath(raw_path)
            try:
                stat = os.stat(path)
            except OSError as error:
                file_problems[(index, modality)] = [f"{path}: cannot stat ({error.strerror or error})"]
                sizes[index][modality] = None
                updated.pop(rel(path), None)
                continue
            signature = [stat.st_size, stat.st_mtime_ns]
            entry = known.get(rel(path))
            if isinstance(entry, list) and len(entry) == 4 and entry[:2] == signature and all_ints(entry):
                sizes[index][modality] = (int(entry[2]), int(entry[3]))
                cached += 1
            else:
                todo.append((index, modality, path, signature))

    def run(chunk: Sequence[tuple[int, str, str, list[int]]]) -> list[_FileResult]:
        return [_check_file(path, modality, readers[modality], checks) for _, modality, path, _ in chunk]

    chunks = [todo[i : i + _CHUNK] for i in range(0, len(todo), _CHUNK)]
    results: list[list[_FileResult]] = [[] for _ in chunks]
    show = progress and sys.stderr.isatty()
    with tqdm(total=len(todo), desc=f"checking {root}", unit="file", leave=False, disable=not show) as bar:
        if workers <= 0 or len(chunks) <= 1:
            for i, chunk in enumerate(chunks):
                results[i] = run(chunk)
                bar.update(len(chunk))
        else:
            with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="data-check") as pool:
                futures = {pool.submit(run, chunk): i for i, chunk in enumerate(chunks)}
                for future in concurrent.futures.as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(len(chunks[futures[future]]))

    for chunk, chunk_results in zip(chunks, results, strict=True):
        for (index, modality, path, signature), result in zip(chunk, chunk_results, strict=True):
            sizes[index][modality] = result.size
            if result.problems:
                file_problems[(index, modality)] = result.problems
                updated.pop(rel(path), None)
            else:
                assert result.size is not None
                updated[rel(path)] = [*signature, *result.size]

    # Problems in dataset order: each file's own, then the sample's size disagreement (from cached or new sizes).
    problems: list[str] = []
    for index, sample in enumerate(samples):
        for modality in sample:
            problems.extend(file_problems.get((index, modality), ()))
        known_sizes = {m: s for m, s in sizes[index].items() if s is not None}
        if len(known_sizes) == len(sample) and len(set(known_sizes.values())) > 1:
            first = os.fspath(next(iter(sample.values())))
            described = ", ".join(f"{os.fspath(sample[m])} is {h}x{w}" for m, (h, w) in known_sizes.items())
            problems.append(f"{first}: the modalities of this sample differ in size (HxW): {described}")

    written: Path | None = cache_path
    if updated != known or section_key not in sections:
        sections.pop(section_key, None)
        sections[section_key] = {"files": updated}  # last = most recently used
        while len(sections) > _MAX_SECTIONS:
            sections.pop(next(iter(sections)))
        if not write_cache(cache_path, cache):
            written = None

    report = ValidationReport(
        roots=[root],
        files=total,
        checked=len(todo),
        cached=cached,
        problems=problems,
        seconds=time.perf_counter() - start,
        cache_files=[written],
    )
    log.info(
        "data check of %s: %d files, %d read, %d unchanged since the last check, %d problem(s), %.1f s",
        root,
        report.files,
        report.checked,
        report.cached,
        len(problems),
        report.seconds,
    )
    return report


# -- dataset front ends ------------------------------------------------------------------------------------------


def validate_folder(
    dataset: MultiModalFolder,
    *,
    min_size: int = 1,
    num_classes: int | None = None,
    ignore_index: int = SEG_IGNORE_INDEX,
    reduce_zero_label: bool = False,
    workers: int | None = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    fallback_dir: str | os.PathLike[str] | None = None,
) -> ValidationReport:
    """Validates every file of a `MultiModalFolder` with the dataset's own readers.

    Args:
        dataset: The split to check.
        min_size: Smallest accepted height and width (the encoder's patch size).
        num_classes: Number of semseg classes; None skips the class-id check.
        ignore_index: Semseg id that is ignored (always valid).
        reduce_zero_label: Stored semseg id 0 is unlabeled and k is class k - 1 (ids 0..num_classes are valid).
        workers: Decoding threads; 0 reads in this thread, None uses `default_workers()`.
        cache_dir: Folder of the cache file; None uses the split folder if writable, else ``fallback_dir``.
        progress: Show a progress bar (only on a terminal).
        fallback_dir: Folder of the cache when the split folder is read-only (None: the user cache).

    Returns:
        The report; ``raise_if_problems()`` raises the DataFormatError listing the problems.
    """
    samples = [dataset.sample_paths(index) for index in range(len(dataset))]
    return validate_samples(
        samples,
        dataset._readers,  # exactly the loader's readers, so a file passes here iff it loads in training
        root=dataset.root,
        checks=FileChecks(min_size, num_classes, ignore_index, reduce_zero_label),
        workers=workers,
        cache_dir=cache_dir,
        progress=progress,
        fallback_dir=fallback_dir,
    )


def validate_image_folder(
    dataset: ImageFolder,
    *,
    min_size: int = 1,
    workers: int | None = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    fallback_dir: str | os.PathLike[str] | None = None,
) -> ValidationReport:
    """Validates every image of an ``ImageFolder`` (e.g. `ImageFolderItems`): decodable 8-bit colour, big enough.

    Args:
        dataset: The split to check (its ``samples`` are ``(path, class index)``).
        min_size: Smallest accepted height and width (the encoder's patch size).
        workers: Decoding threads; 0 reads in this thread, None uses `default_workers()`.
        cache_dir: Folder of the cache file; None uses the split folder if writable, else ``fallback_dir``.
        progress: Show a progress bar (only on a terminal).
        fallback_dir: Folder of the cache when the split folder is read-only (None: the user cache).

    Returns:
        The report; ``raise_if_problems()`` raises the DataFormatError listing the problems.
    """
    return validate_samples(
        [{"rgb": path} for path, _ in dataset.samples],
        {"rgb": read_rgb},
        root=dataset.root,
        checks=FileChecks(min_size=min_size),
        workers=workers,
        cache_dir=cache_dir,
        progress=progress,
        fallback_dir=fallback_dir,
    )


# -- DataLoader worker errors ------------------------------------------------------------------------------------

_WORKER_PREFIX = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.S)


def clean_worker_error(error: BaseException) -> str:
    """The original message of an exception re-raised from a DataLoader worker, without the worker traceback.

    PyTorch re-raises a worker's exception in the main process with the worker's formatted traceback as its
    message; the user needs only its last part (for data errors, ``"<path>: <what is wrong>"``).

    Args:
        error: Any exception.

    Returns:
        The worker exception's own message for a re-raised worker error, else ``str(error)``.
    """
    text = str(error)
    if not _WORKER_PREFIX.match(text):
        return text
    # The traceback ends with "<module>.<ExceptionName>: <message>" (message possibly multi-line); frames are
    # indented, so the last unindented line naming the exception type starts the message.
    name = re.escape(type(error).__name__)
    for pattern in (rf"^(?:[\w.]+\.)?{name}: ", r"^[A-Za-z_][\w.]*: "):
        matches = list(re.finditer(pattern, text, re.M))
        if matches:
            return text[matches[-1].end() :].strip()
    return text
