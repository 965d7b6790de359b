"""The process-wide RNG states in every checkpoint, restored on resume: a run-level callback every run gets."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from attent_vision.seeds import capture_rng_state, restore_rng_state


class RngStateCapture(pl.Callback):
    """Saves the torch, CUDA, numpy and Python RNG states with each checkpoint and restores them when a run resumes.

    Whatever draws from the global generators after the checkpoint (augmentation in the main process, mixup,
    dropout and drop-path) then draws what an uninterrupted run would have drawn. Loader workers seed themselves
    from the loader's own generator, so with ``data.num_workers > 0`` a resumed epoch's augmentation differs.
    """

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:  # checkpoints written before this callback existed hold none
            restore_rng_state(state_dict)
