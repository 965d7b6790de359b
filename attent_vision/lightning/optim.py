"""The one optimizer and learning-rate recipe of pretraining and fine-tuning.

Both modules build their optimizer the same way: parameter groups from timm (weight decay off for norms, biases,
tokens and embeddings; with ``layer_decay``, timm's per-layer LR scales from the network's ``group_matcher``), the
optimizer class from one Hydra ``_partial_`` node (``model.optimizer`` / ``module.optimizer``), the learning rate
scaled by the global batch (``lr = blr × batch / 256``, as MAE), and a per-step schedule: linear warmup, then cosine
decay that lands on ``min_lr`` at the last step.

Pretraining's plan may change its step count while it runs: InfoBatch's pruned epochs get their exact length
when their scores are known, and a schedule sized for the first estimate would then end too early or too late.
:class:`StepRemap` maps each optimizer step to a *position* on a schedule built once for ``planned_total`` steps:
until a resize, position = step (so fixed plans are untouched); after ``resize(total, at_step=s)`` the positions
still ahead are spread evenly over the steps still ahead. Every step gets its own, increasing position, the LR
stays continuous, and the last step of the run lands on the schedule's last position (``min_lr``) exactly, since
the plan is exact by the time its last epoch starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

OptimizerFactory = Callable[..., torch.optim.Optimizer]

__all__ = [
    "OptimizerFactory",
    "StepRemap",
    "build_optimizer",
    "resume_trained_weights",
    "scaled_lr",
    "warmup_cosine_lr",
    "warmup_cosine_scheduler",
]


@runtime_checkable
class _HasNoWeightDecay(Protocol):
    def no_weight_decay(self) -> set[str]:
        """Names of parameters exempt from weight decay (timm's convention)."""


def scaled_lr(blr: float, global_batch: int) -> float:
    """MAE's learning-rate scaling: ``blr × global batch / 256``."""
    return blr * global_batch / 256


def build_optimizer(
    factory: OptimizerFactory,
    net: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    extra_groups: Iterable[dict[str, Any]] = (),
) -> torch.optim.Optimizer:
    """The optimizer over ``net``'s parameter groups (and ``extra_groups``), each group at ``lr`` × its scale.

    Args:
        factory: The optimizer class with its fixed arguments (a Hydra ``_partial_`` node), called as
            ``factory(groups, lr=lr)``.
        net: The network; ``net.no_weight_decay()`` names parameters exempt from weight decay, and with
            ``layer_decay`` ``net.group_matcher()`` assigns parameters to layers (timm's conventions).
        lr: The learning rate of the top layer.
        weight_decay: Weight decay of the decayed groups.
        layer_decay: Layer-wise LR decay (None or 1.0: off): layer ``i`` of ``L`` trains at ``lr × decay^(L - i)``.
        extra_groups: More groups (e.g. a task balancer's parameters), at ``lr``.
    """
    no_decay = set(net.no_weight_decay()) if isinstance(net, _HasNoWeightDecay) else set()
    if layer_decay not in (None, 1.0):
        groups = param_groups_layer_decay(
            net, weight_decay=weight_decay, layer_decay=layer_decay, no_weight_decay_list=no_decay
        )
    else:
        groups = param_groups_weight_decay(net, weight_decay, no_weight_decay_list=no_decay)
    groups = [*groups, *extra_groups]
    for group in groups:
        # The scale goes into the group's own lr: torch's schedulers multiply that, and ignore timm's lr_scale.
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return factory(groups, lr=lr)


def warmup_cosine_lr(
    step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup rises linearly to ``base_lr`` over ``warmup_steps`` steps, starting at ``base_lr / warmup_steps``
    rather than 0 so no step is wasted. The cosine then reaches ``min_lr`` exactly at step ``total_steps - 1``.
    Steps past the end stay at ``min_lr``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:  # no room to decay: the last step still lands on min_lr
        return min_lr if step >= total_steps - 1 else base_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass
class StepRemap:
    """Step -> schedule position for a schedule of ``planned_total`` positions.

    Args:
        planned_total: Steps the schedule was built for (its positions run from 0 to ``planned_total - 1``).
    """

    planned_total: int
    total: int = 0
    anchor_step: int = 0
    anchor_position: float = 0.0

    def __post_init__(self) -> None:
        if self.planned_total < 1:
            raise ValueError(f"planned_total must be >= 1, got {self.planned_total}")
        self.total = self.total or self.planned_total

    def position(self, step: int) -> float:
        """Schedule position of optimizer step ``step`` (0-based)."""
        if self.total == self.planned_total and self.anchor_step == 0:
            return float(step)  # never resized: the identity, bit for bit
        steps_left = self.total - 1 - self.anchor_step
        positions_left = self.planned_total - 1 - self.anchor_position
        if steps_left <= 0:
            return float(self.planned_total - 1)
        return self.anchor_position + (step - self.anchor_step) * positions_left / steps_left

    def resize(self, total: int, *, at_step: int) -> None:
        """The run now has ``total`` steps; steps before ``at_step`` keep their positions."""
        if total < 1:
            raise ValueError(f"total must be >= 1, got {total}")
        if total == self.total:
            return
        self.anchor_position = self.position(at_step)
        self.anchor_step = at_step
        self.total = total


def _relative_lr(step: int, *, remap: StepRemap, min_ratio: float, warmup_steps: int) -> float:
    return warmup_cosine_lr(
        remap.position(step),
        base_lr=1.0,
        min_lr=min_ratio,
        warmup_steps=warmup_steps,
        total_steps=remap.planned_total,
    )


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    min_ratio: float,
    remap: StepRemap | None = None,
) -> dict[str, Any]:
    """Lightning's ``lr_scheduler`` entry for :func:`warmup_cosine_lr`, stepped per optimizer step.

    Each group's lr follows the schedule relative to its own starting lr (so layer-decay scales hold), reaching
    ``min_ratio`` of it at the last step. ``remap`` (default: a fixed ``total_steps``) lets the run resize it.
    """
    remap = remap or StepRemap(total_steps)
    schedule = partial(_relative_lr, remap=remap, min_ratio=min_ratio, warmup_steps=warmup_steps)
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), "interval": "step"}


def resume_trained_weights(trainer: pl.Trainer | None, checkpoint: dict[str, Any]) -> None:
    """Let a fit resumed without weight averaging go on from the trained weights (a module's ``on_load_checkpoint``).

    A checkpoint of a run with an EMA of its weights (``callbacks=ema``) holds the average in ``state_dict`` and the
    trained weights in ``current_model_state``. Resumed with the averaging callback, the callback restores both;
    resumed without it, Lightning would silently continue training from the average, so the trained weights are put
    back in its place. Evaluating such a checkpoint (not fitting) keeps the average.
    """
    if "current_model_state" not in checkpoint or trainer is None or trainer.state.fn != "fit":
        return
    if any(isinstance(callback, WeightAveraging) for callback in trainer.callbacks):
        return
    rank_zero_warn(
        "resuming a checkpoint written with weight averaging (callbacks=ema) without it: training goes on from the "
        "trained weights (current_model_state); the average is dropped"
    )
    checkpoint["state_dict"] = checkpoint["current_model_state"]
