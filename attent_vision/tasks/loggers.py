"""Logger factories that need a decision at run time."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger


def wandb_logged_in() -> bool:
    """True when W&B has credentials (env var or ``wandb login``), so an online run can start."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        return bool(wandb.api.api_key)
    except Exception:
        return False


def build_wandb_logger(*, offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """A WandbLogger that runs offline (no account needed) unless the user is logged in.

    Args:
        offline: ``None`` decides from the login state; ``True``/``False`` forces the mode.
        **kwargs: Passed to :class:`lightning.pytorch.loggers.WandbLogger`.
    """
    if os.environ.get("WANDB_MODE") in {"offline", "disabled"}:
        offline = True
    if offline is None:
        offline = not wandb_logged_in()
    # Lightning's offline flag sets WANDB_MODE=dryrun, which current wandb no longer honours; say it to wandb.init.
    return WandbLogger(offline=offline, mode="offline" if offline else "online", **kwargs)
