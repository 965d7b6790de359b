"""Checkpoints that survive being killed at any moment, and the choice of which one a run resumes from.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file, syncs it and renames it into place, so a
  checkpoint file is either complete or absent.
- :class:`AsyncAtomicCheckpointIO` does those writes in a background thread while training goes on, and runs the
  file operations that depend on a write (re-pointing ``last.ckpt``, deleting the superseded file) after it, in
  order, so that a kill at any moment still leaves ``last.ckpt`` pointing to a complete file.
- :class:`SafeModelCheckpoint` re-points ``last.ckpt`` atomically and deletes a superseded epoch file only after
  ``last.ckpt`` points to its successor, so ``last.ckpt`` never dangles; with ``min_interval_s`` it skips epoch-end
  saves that come sooner than that after the previous one (the first and the last epoch always save).
- :func:`find_resume_checkpoint` picks the newest checkpoint of a run directory that actually loads (epoch files,
  ``last.ckpt``, crash and stop checkpoints), and refuses to let a run silently start over when checkpoints exist
  but none loads. Diverged states (``checkpoints/diverged/``) are never candidates.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO

log = logging.getLogger(__name__)

__all__ = [
    "DIVERGED_DIR",
    "AsyncAtomicCheckpointIO",
    "AtomicCheckpointIO",
    "NoLoadableCheckpointError",
    "ResumePoint",
    "SafeModelCheckpoint",
    "atomic_torch_save",
    "find_resume_checkpoint",
    "find_resume_checkpoint_file",
    "remove_partial_writes",
    "set_aside_checkpoints",
    "wait_for_checkpoint_writes",
]

DIVERGED_DIR = "diverged"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes (temporary file, fsync, rename)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)


class AsyncAtomicCheckpointIO(AsyncCheckpointIO):
    """Atomic checkpoint writes in one background thread, with the file operations that depend on them queued behind.

    The caller's thread takes a deep copy of the checkpoint (tensors and the mutable Python state that callbacks
    hand in, such as the teacher's histories), so training can change its state at once; the write, the rename, and
    then any operation queued with :meth:`after_writes` (``last.ckpt`` re-pointing, deleting superseded files) run in
    submission order. At most one write is pending: a save waits for the previous one, so memory holds at most two
    copies and a slow disk slows training instead of piling up copies. After a failed write nothing queued behind it
    runs (``last.ckpt`` keeps pointing to the last complete file) and the next save, wait or teardown raises it.
    """

    def __init__(self) -> None:
        super().__init__(AtomicCheckpointIO())

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        self.wait()
        snapshot = copy.deepcopy(checkpoint)
        self.after_writes(self.checkpoint_io.save_checkpoint, snapshot, path, storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        self.after_writes(self.checkpoint_io.remove_checkpoint, path)

    def after_writes(self, operation: Callable[..., Any], *args: Any) -> Future:
        """Runs ``operation(*args)`` in the writer thread once every write submitted before it is complete."""
        self._raise_error()
        self._ensure_setup()
        assert self._executor is not None
        return self._executor.submit(self._unless_failed, operation, *args)

    def _unless_failed(self, operation: Callable[..., Any], *args: Any) -> None:
        if self._error is not None:
            return  # an earlier write failed: nothing that depends on it may run
        try:
            operation(*args)
        except BaseException as error:
            self._error = error

    def wait(self) -> None:
        """Blocks until every queued write and file operation is done; raises a failed write's error."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"a checkpoint write in the background failed: {error}") from error

    def teardown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._raise_error()


def wait_for_checkpoint_writes(trainer: pl.Trainer) -> None:
    """Returns once every checkpoint the trainer has saved is complete on disk (a no-op with synchronous writes)."""
    checkpoint_io = trainer.strategy.checkpoint_io
    if isinstance(checkpoint_io, AsyncAtomicCheckpointIO):
        checkpoint_io.wait()


class SafeModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always points to a complete file.

    Lightning deletes the superseded epoch file before re-linking ``last.ckpt`` (a kill in between leaves a dangling
    link) and replaces the link by remove-then-create. Here superseded files are deleted only after the link points
    to their successor, and the link is swapped in with one atomic rename.

    Args:
        min_interval_s: Skip an epoch-end save that would come sooner than this after the previous save (the first
            and the last epoch of a fit always save). Short epochs then stop paying a write each, and a hard kill
            loses at most this much training; stop signals, crashes and SLURM requeues write their own checkpoint
            whatever it says. 0: every epoch.
        **kwargs: ``ModelCheckpoint``'s arguments.
    """

    def __init__(self, *, min_interval_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_interval_s = min_interval_s
        self._superseded: list[str] = []
        self._last_save: float | None = None

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._last_save = time.monotonic()

    def _too_soon(self, trainer: pl.Trainer) -> bool:
        """An epoch-end save within ``min_interval_s`` of the previous one (never the first or the last epoch's).

        Rank 0's clock decides for every rank: saving includes a barrier, so ranks that disagreed would hang.
        """
        if self.min_interval_s <= 0:
            return False
        soon = (
            self._last_save is not None
            and not _is_last_epoch(trainer)
            and time.monotonic() - self._last_save < self.min_interval_s
        )
        if trainer.world_size > 1:
            soon = bool(trainer.strategy.broadcast(soon, src=0))
        return soon

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self._superseded.append(filepath)

    def _delete_superseded(self, trainer: pl.Trainer) -> None:
        # By name, not through last.ckpt on disk: with asynchronous writes its swap to the newest file may still be
        # queued, and resolving it now would keep the file it is about to leave.
        newest = self._last_checkpoint_saved
        keep = {os.path.abspath(p) for p in (self.last_model_path, self.best_model_path, newest) if p}
        for filepath in self._superseded:
            if os.path.abspath(filepath) not in keep:
                trainer.strategy.remove_checkpoint(filepath)
        self._superseded = []

    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            checkpoint_io = trainer.strategy.checkpoint_io
            if isinstance(checkpoint_io, AsyncAtomicCheckpointIO):
                checkpoint_io.after_writes(_swap_link, filepath, linkpath)  # only once its target is complete
            else:
                _swap_link(filepath, linkpath)
        trainer.strategy.barrier()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, *args, **kwargs)
        self._delete_superseded(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._too_soon(trainer):
            super().on_train_epoch_end(trainer, pl_module)
        self._delete_superseded(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._delete_superseded(trainer)


def _is_last_epoch(trainer: pl.Trainer) -> bool:
    """Whether the epoch ending now is the fit's last (max_epochs or max_steps reached, or a stop requested)."""
    if trainer.should_stop:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
        return True
    return trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step


def _swap_link(filepath: str, linkpath: str) -> None:
    """Points ``linkpath`` to ``filepath`` with one atomic rename of a fresh relative symlink."""
    if os.path.isdir(linkpath) and not os.path.islink(linkpath):
        shutil.rmtree(linkpath)
    tmp = f"{linkpath}.tmp-link"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
    os.replace(tmp, linkpath)
    _fsync_dir(Path(linkpath).parent)


class NoLoadableCheckpointError(RuntimeError):
    """The run directory has checkpoints, but none of them loads."""


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to resume from and how far it got."""

    path: Path
    epoch: int
    global_step: int

    def describe(self, run_dir: Path) -> str:
        try:
            shown = self.path.relative_to(run_dir)
        except ValueError:
            shown = self.path
        return f"{shown} (epoch {self.epoch}, step {self.global_step})"


def _candidates(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run directory, symlinks resolved, temporary and diverged files left out."""
    found: dict[Path, Path] = {}
    paths = [*Path(run_dir, "checkpoints").glob("*.ckpt"), *Path(run_dir).glob("hpc_ckpt_*.ckpt")]
    for path in paths:
        if path.name.startswith("."):
            continue
        real = path.resolve()
        if real.is_file() and real.parent.name != DIVERGED_DIR:
            found.setdefault(real, path)
    return sorted(found)


def _progress(path: Path) -> tuple[int, int]:
    """(epoch, global_step) of a Lightning checkpoint; raises when the file does not load."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError("not a Lightning checkpoint (no state_dict)")
    return int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0))


def find_resume_checkpoint(run_dir: str | os.PathLike[str]) -> ResumePoint | None:
    """The newest loadable checkpoint of ``run_dir`` (most optimizer steps, then newest file), or None if it has none.

    Raises:
        NoLoadableCheckpointError: Checkpoints exist but none loads; the message lists each file and why.
    """
    run_dir = Path(run_dir)
    points, problems = [], []
    for path in _candidates(run_dir):
        try:
            epoch, step = _progress(path)
        except Exception as error:  # a truncated or foreign file: report it, try the next one
            problems.append(f"{path}: {type(error).__name__}: {error}")
            continue
        points.append((step, path.stat().st_mtime, ResumePoint(path, epoch, step)))
    if points:
        for problem in problems:
            log.warning("Skipping a checkpoint that does not load: %s", problem)
        return max(points, key=lambda item: item[:2])[2]
    if problems:
        raise NoLoadableCheckpointError(
            f"{run_dir} has checkpoints but none of them loads, so the run cannot resume:\n  "
            + "\n  ".join(problems)
            + "\nTo start over in this directory anyway, pass resume=restart (the files are moved to "
            "checkpoints/set_aside_<time>/), or choose another run directory."
        )
    return None


def find_resume_checkpoint_file(path: Path) -> ResumePoint:
    """A checkpoint named explicitly (``ckpt_path=``), checked to load.

    Raises:
        NoLoadableCheckpointError: The file does not load.
    """
    real = path.resolve()
    try:
        epoch, step = _progress(real)
    except Exception as error:
        raise NoLoadableCheckpointError(f"{path} does not load: {type(error).__name__}: {error}") from None
    return ResumePoint(real, epoch, step)


def remove_partial_writes(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Deletes the temporary files of checkpoint writes that a kill interrupted (they never replaced anything)."""
    folder = Path(run_dir, "checkpoints")
    partial = [p for p in folder.glob(".*.tmp-*") if p.is_file() or p.is_symlink()]
    partial += [p for p in folder.glob("*.tmp-link") if p.is_symlink() or p.is_file()]
    for path in partial:
        path.unlink(missing_ok=True)
    return partial


def set_aside_checkpoints(run_dir: str | os.PathLike[str]) -> Path | None:
    """Moves every checkpoint of ``run_dir`` into ``checkpoints/set_aside_<time>/`` (for ``resume=restart``)."""
    ckpt_dir = Path(run_dir, "checkpoints")
    files = [p for p in ckpt_dir.glob("*.ckpt")] + list(Path(run_dir).glob("hpc_ckpt_*.ckpt"))
    if not files:
        return None
    target = ckpt_dir / time.strftime("set_aside_%Y%m%d_%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        os.replace(path, target / path.name)
    return target
