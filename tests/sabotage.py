"""A callback that breaks a run on purpose at a given optimizer step (tests only), once per run directory."""

from __future__ import annotations

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
        action: "raise", "signal:<NAME>" (the process signals itself), "poison" (set every weight to NaN, as a
            diverging optimizer step does, so the next loss is non-finite) or "marker" (write ``marker``, then
            sleep, so that a test can signal the process from outside).
        marker: File written when acting; its presence also keeps a resumed run from acting again.
    """

    def __init__(self, *, at_step: int, action: str, marker: str) -> None:
        self.at_step, self.action, self.marker = at_step, action, Path(marker)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if trainer.global_step != self.at_step or self.marker.exists():
            return
        if trainer.is_global_zero:
            self.marker.write_text(str(os.getpid()))
        if self.action == "raise":
            raise RuntimeError(f"sabotage at step {self.at_step}")
        if self.action == "poison":
            with torch.no_grad():
                for param in pl_module.parameters():
                    param.fill_(float("nan"))
            return
        if self.action.startswith("signal:"):
            if trainer.is_global_zero:
                os.kill(os.getpid(), getattr(signal, self.action.split(":", 1)[1]))
            return
        if self.action == "marker":  # the test signals the process from outside meanwhile
            stop = next(cb for cb in trainer.callbacks if hasattr(cb, "received"))
            for _ in range(600):
                if stop.received is not None:
                    return
                time.sleep(0.1)
