"""A callback that breaks a run on purpose at a given optimizer step (tests only), once per run directory."""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class Sabotage(pl.Callback):
    """At ``at_step``: raise an error, send this process a signal, or write a marker and wait for an outside signal.

    Args:
        at_step: Optimizer step after which to act.
        action: One of

            - "raise";
            - "raise-in-window": raise after the first training batch of the accumulation window that follows step
              ``at_step`` (between its batches: the crash checkpoint holds a partial window);
            - "signal:<NAME>": the process signals itself after the training batch of ``at_step``;
            - "signal-in-scoring:<NAME>": it signals itself inside the second batch of the teacher's scoring pass
              that runs at ``at_step`` (0: the pass a resumed run makes before training);
            - "signal-in-validation:<NAME>": it signals itself as the second batch of the validation at ``at_step``
              starts;
            - "sigint-twice": after the training batch of ``at_step``, SIGINT, then a long wait (a slow batch) in
              which a second SIGINT comes;
            - "poison": set every weight to NaN, as a diverging optimizer step does, so the next loss is non-finite;
            - "marker": write ``marker``, then sleep, so that a test can signal the process from outside;
            - "stall-write": the next checkpoint write (in the background writer thread) writes half its temporary
              file, writes ``marker`` and then hangs, while training goes on, so that a test can kill the process
              in the middle of an asynchronous write.
        marker: File written when acting; its presence also keeps a resumed run from acting again. The signalling
            actions other than "signal:" write JSON: the pid, the time of the signal, and ``batches_after_signal``,
            the batches of the interrupted pass (scoring or validation) that started after the signal.
    """

    def __init__(self, *, at_step: int, action: str, marker: str) -> None:
        self.at_step, self.action, self.marker = at_step, action, Path(marker)
        self.kind, _, name = action.partition(":")
        self.signum = getattr(signal, name) if name else None
        self._fired = False
        self._pass_batch = 0
        self._record: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ helpers

    def _due(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step == self.at_step and not self.marker.exists() and not self._fired

    def _fire(self, trainer: pl.Trainer, signum: int) -> None:
        """Signals this process (rank 0 only); the batch in flight goes on."""
        self._fired = True
        self._record = {"pid": os.getpid(), "signal_time": time.time(), "batches_after_signal": 0}
        if trainer.is_global_zero:
            self.marker.write_text(json.dumps(self._record))
            os.kill(os.getpid(), signum)

    def _count_batch_after_signal(self, trainer: pl.Trainer) -> None:
        self._record["batches_after_signal"] += 1
        if trainer.is_global_zero:
            self.marker.write_text(json.dumps(self._record))

    def _on_pass_batch(self, trainer: pl.Trainer) -> None:
        """A batch of the watched pass starts: signal at its second batch, count the batches after that."""
        if self._fired:
            self._count_batch_after_signal(trainer)
        elif self._due(trainer):
            self._pass_batch += 1
            if self._pass_batch == 2:
                self._fire(trainer, self.signum)

    # ------------------------------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.kind != "signal-in-scoring" or stage != "fit":
            return
        score_batch = pl_module.score_batch

        @functools.wraps(score_batch)  # keeps its signature, which the teacher inspects
        def watched(*args: Any, **kwargs: Any) -> Any:
            self._on_pass_batch(trainer)
            return score_batch(*args, **kwargs)

        pl_module.score_batch = watched  # the real scoring still runs: this only watches it

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pass_batch = 0

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self.kind == "signal-in-validation" and not trainer.sanity_checking:
            self._on_pass_batch(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if self.kind in ("signal-in-scoring", "signal-in-validation"):
            self._pass_batch = 0  # a scoring pass follows training batches: count its batches from its first
            return
        if trainer.global_step != self.at_step or self.marker.exists():
            return
        if self.action == "raise-in-window" and not trainer.fit_loop.epoch_loop._should_accumulate():
            return  # the batch that made step at_step: wait for the next one, inside the following window
        if self.kind == "sigint-twice":
            self._fire(trainer, signal.SIGINT)
            stop = next(cb for cb in trainer.callbacks if hasattr(cb, "received"))
            for _ in range(600):  # a slow batch: the second Ctrl-C must end it at once
                if stop.received is not None and trainer.is_global_zero:
                    os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)
            return
        if self.action == "stall-write":
            if not self._fired:
                self._fired = True
                self._stall_next_write(trainer)  # it writes the marker once the write has stalled
            return
        if trainer.is_global_zero:
            self.marker.write_text(str(os.getpid()))
        if self.action in ("raise", "raise-in-window"):
            raise RuntimeError(f"sabotage at step {self.at_step}")
        if self.action == "poison":
            with torch.no_grad():
                for param in pl_module.parameters():
                    param.fill_(float("nan"))
            return
        if self.kind == "signal":
            if trainer.is_global_zero:
                os.kill(os.getpid(), self.signum)
            return
        if self.action == "marker":  # the test signals the process from outside meanwhile
            stop = next(cb for cb in trainer.callbacks if hasattr(cb, "received"))
            for _ in range(600):
                if stop.received is not None:
                    return
                time.sleep(0.1)

    def _stall_next_write(self, trainer: pl.Trainer) -> None:
        atomic = (
            trainer.strategy.checkpoint_io.checkpoint_io
        )  # AsyncAtomicCheckpointIO wraps AtomicCheckpointIO
        marker = self.marker

        def stalled(checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
            path = Path(path)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # where atomic_torch_save writes
            payload = io.BytesIO()
            torch.save(checkpoint, payload)
            tmp.write_bytes(payload.getvalue()[: len(payload.getvalue()) // 2])
            marker.write_text(json.dumps({"pid": os.getpid(), "path": str(path)}))
            time.sleep(600)

        atomic.save_checkpoint = stalled
