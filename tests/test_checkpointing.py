"""Asynchronous atomic checkpoint writes: snapshot semantics, ordering of the operations that depend on a write, and
what happens after a failed write. (A kill -9 in the middle of a real run's asynchronous write: test_stops.)"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from attent_vision.runs.checkpointing import AsyncAtomicCheckpointIO, SafeModelCheckpoint, _swap_link

from .conftest import ddp_strategy


def _gated(io: AsyncAtomicCheckpointIO, gate: threading.Event, fail: bool = False) -> list[str]:
    """Makes the wrapped atomic writer wait for ``gate`` (and then fail, if asked); returns the paths it wrote."""
    atomic = io.checkpoint_io
    real_save = atomic.save_checkpoint
    written: list[str] = []

    def save(checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        assert gate.wait(30), "the test never opened the gate"
        if fail:
            raise OSError(28, "No space left on device")
        real_save(checkpoint, path, storage_options)
        written.append(Path(path).name)

    atomic.save_checkpoint = save
    return written


def test_the_written_checkpoint_is_the_state_at_the_call_not_at_the_write(tmp_path: Path) -> None:
    io = AsyncAtomicCheckpointIO()
    gate = threading.Event()
    _gated(io, gate)
    weights = torch.zeros(4)
    history = [{"epoch": 0}]
    io.save_checkpoint({"state_dict": {"w": weights}, "history": history}, tmp_path / "a.ckpt")
    weights += 7  # training goes on while the write waits
    history.append({"epoch": 1})
    gate.set()
    io.wait()
    saved = torch.load(tmp_path / "a.ckpt", weights_only=False)
    assert torch.equal(saved["state_dict"]["w"], torch.zeros(4))
    assert saved["history"] == [{"epoch": 0}]
    io.teardown()


def test_link_and_removal_wait_for_the_write_they_depend_on(tmp_path: Path) -> None:
    io = AsyncAtomicCheckpointIO()
    old = tmp_path / "epoch_000.ckpt"
    torch.save({"epoch": 0}, old)
    link = tmp_path / "last.ckpt"
    _swap_link(str(old), str(link))
    gate = threading.Event()
    written = _gated(io, gate)
    new = tmp_path / "epoch_001.ckpt"
    io.save_checkpoint({"epoch": 1}, new)
    io.after_writes(_swap_link, str(new), str(link))
    io.remove_checkpoint(old)
    # While the write is pending: the old file and the link to it stay, so a kill now loses nothing.
    assert link.resolve() == old.resolve() and old.exists() and not new.exists()
    gate.set()
    io.wait()
    assert written == ["epoch_001.ckpt"]
    assert link.resolve() == new.resolve() and not old.exists()
    assert torch.load(link, weights_only=False) == {"epoch": 1}
    io.teardown()


def test_after_a_failed_write_nothing_that_depends_on_it_runs_and_the_error_surfaces(tmp_path: Path) -> None:
    io = AsyncAtomicCheckpointIO()
    old = tmp_path / "epoch_000.ckpt"
    torch.save({"epoch": 0}, old)
    link = tmp_path / "last.ckpt"
    _swap_link(str(old), str(link))
    gate = threading.Event()
    _gated(io, gate, fail=True)
    new = tmp_path / "epoch_001.ckpt"
    io.save_checkpoint({"epoch": 1}, new)
    io.after_writes(_swap_link, str(new), str(link))
    io.remove_checkpoint(old)
    gate.set()
    with pytest.raises(RuntimeError, match=r"checkpoint write in the background failed: .*No space left"):
        io.wait()
    assert link.resolve() == old.resolve() and old.exists() and not new.exists()
    io.teardown()  # the error was reported once; teardown does not raise it again


def test_a_save_waits_for_the_previous_write_so_copies_never_pile_up(tmp_path: Path) -> None:
    io = AsyncAtomicCheckpointIO()
    gate = threading.Event()
    written = _gated(io, gate)
    io.save_checkpoint({"epoch": 0}, tmp_path / "epoch_000.ckpt")
    second = threading.Thread(target=io.save_checkpoint, args=({"epoch": 1}, tmp_path / "epoch_001.ckpt"))
    second.start()
    second.join(0.5)
    assert second.is_alive(), "the second save returned while the first write was still pending"
    gate.set()
    second.join(30)
    io.wait()
    assert written == ["epoch_000.ckpt", "epoch_001.ckpt"]
    io.teardown()


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)


def _fit_with(
    tmp_path: Path, min_interval_s: float, max_epochs: int = 5, **trainer_kwargs: Any
) -> tuple[list[int], Path]:
    """Fits 5 two-step epochs; returns the epochs whose end wrote a checkpoint (in this process), and the folder."""
    checkpoints = tmp_path / "checkpoints"
    callback = SafeModelCheckpoint(
        dirpath=checkpoints, filename="epoch_{epoch:03d}", auto_insert_metric_name=False, save_last="link",
        save_top_k=1, monitor=None, every_n_epochs=1, save_on_train_epoch_end=True, min_interval_s=min_interval_s,
    )  # fmt: skip
    saved: list[int] = []
    original = callback._save_checkpoint

    def recording(trainer: pl.Trainer, filepath: str) -> None:
        saved.append(trainer.current_epoch)
        original(trainer, filepath)

    callback._save_checkpoint = recording
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback, *trainer_kwargs.pop("callbacks", [])],
        plugins=[AsyncAtomicCheckpointIO()], default_root_dir=tmp_path, **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(_Tiny())
    return sorted(set(saved)), checkpoints


def test_a_minimum_interval_skips_epoch_end_saves_but_never_the_first_or_last(tmp_path: Path) -> None:
    saved, checkpoints = _fit_with(tmp_path / "hourly", min_interval_s=3600)
    assert saved == [0, 4]
    assert (checkpoints / "last.ckpt").resolve() == (checkpoints / "epoch_004.ckpt").resolve()
    state = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert (state["epoch"], state["global_step"]) == (4, 10)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_004.ckpt", "last.ckpt"]
    every, _ = _fit_with(tmp_path / "every", min_interval_s=0)
    assert every == [0, 1, 2, 3, 4]


class _ForgetLastSaveOnRank1(pl.Callback):
    """Rank 1 alone believes it never saved, so its own clock would call for a save at every epoch's end."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 1:
            next(cb for cb in trainer.callbacks if isinstance(cb, SafeModelCheckpoint))._last_save = None


def test_under_ddp_rank_0_decides_whether_an_epoch_end_saves(tmp_path: Path) -> None:
    # Saving has a barrier: ranks that disagreed would hang until the 60 s collective timeout fails the test.
    _, checkpoints = _fit_with(
        tmp_path,
        min_interval_s=3600,
        devices=2,
        strategy=ddp_strategy(),
        callbacks=[_ForgetLastSaveOnRank1()],
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_004.ckpt", "last.ckpt"]
