"""LightningModule that pretrains MultiMAE and reports a loss per sample for the AtteNT teacher."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from attent_vision.models.losses import SampleLoss, reduce_batch, truncated_depth_standardize
from attent_vision.tasks.lr_schedule import warmup_cosine_lr

log = logging.getLogger(__name__)

# The extra normalised-pixel output reconstructs the rgb input under rgb's mask.
TARGET_OF_TASK = {"norm_rgb": "rgb"}


class MultiMAEPretrainModule(pl.LightningModule):
    """Masked multi-modal pretraining with the reference MultiMAE recipe.

    Training keeps the reference reduction (mean over samples per task, then task balancing). Every training
    step also returns each sample's score (the sum over tasks of its masked per-sample loss) with its dataset
    index, which is what the AtteNT teacher consumes.

    Args:
        net: The MultiMAE network (``attent_vision.models.MultiMAE``).
        losses: Per-output-task per-sample losses; tasks the network does not predict are dropped.
        task_balancer: Weights the per-task losses (``NoTaskBalancer`` or ``UncertaintyTaskBalancer``).
        optimizer: Partial optimizer taking parameter groups and ``lr`` (default AdamW, betas 0.9/0.95).
        weight_decay: Decay for weights; norms, biases, tokens and embeddings are exempt.
        blr: Base learning rate; ``lr = blr * global_batch / 256``.
        min_lr: Learning rate reached at the last optimizer step.
        warmup_epochs: Linear warmup length in full epochs (ignored when ``warmup_steps`` is set).
        warmup_steps: Linear warmup length in optimizer steps.
        num_encoded_tokens: Visible tokens given to the encoder.
        alphas: Dirichlet concentration of the per-sample modality shares.
        sample_tasks_uniformly: Pick a random non-empty modality subset per sample first.
        tie_break_noise: Resolve rounding of the shares at random (reference) instead of by position.
        standardize_depth: Truncated per-sample depth standardisation (input and target).
        loss_on_unmasked: Compute the losses on every patch instead of the masked ones only.
        fp32_output_adapters: Decoders that run in fp32 under mixed precision.
        compile: ``torch.compile`` the network in place.
        mask_seed: Training masks of sample i in epoch e are drawn from a generator seeded by (mask_seed, e, i):
            they vary across epochs and samples, and do not depend on the global RNG (so a resumed run, and any
            number of ranks, draw the same masks).
        val_mask_seed: Validation masks are drawn from ``val_mask_seed + index`` so val losses are comparable.
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        losses: Mapping[str, nn.Module],
        task_balancer: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        weight_decay: float = 0.05,
        blr: float = 1e-4,
        min_lr: float = 0.0,
        warmup_epochs: float = 40,
        warmup_steps: int | None = None,
        num_encoded_tokens: int = 98,
        alphas: float | Sequence[float] = 1.0,
        sample_tasks_uniformly: bool = False,
        tie_break_noise: bool = True,
        standardize_depth: bool = True,
        loss_on_unmasked: bool = False,
        fp32_output_adapters: Iterable[str] = ("semseg",),
        compile: bool = False,
        mask_seed: int = 0,
        val_mask_seed: int = 1_000_003,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "losses", "task_balancer", "optimizer"], logger=False)
        self.net = net
        self.in_domains = list(net.input_adapters.keys())
        self.losses = nn.ModuleDict({t: fn for t, fn in losses.items() if t in net.output_adapters})
        missing = [t for t in net.output_adapters if t not in self.losses]
        if missing:
            raise ValueError(f"model.losses has no loss for the output task(s) {missing}")
        self.task_balancer = task_balancer
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, betas=(0.9, 0.95))
        self.weight_decay = weight_decay
        self.blr, self.min_lr = blr, min_lr
        self.warmup_epochs, self.warmup_steps = warmup_epochs, warmup_steps
        self.num_encoded_tokens = num_encoded_tokens
        self.alphas = alphas
        self.sample_tasks_uniformly = sample_tasks_uniformly
        self.tie_break_noise = tie_break_noise
        self.standardize_depth = standardize_depth
        self.loss_on_unmasked = loss_on_unmasked
        self.fp32_output_adapters = tuple(fp32_output_adapters)
        self.compile_net = compile
        self.mask_seed = mask_seed
        self.val_mask_seed = val_mask_seed
        # The exact optimizer-step count of the run; the AtteNT teacher sets it from its plan. When None,
        # Lightning's estimate is used (right only when every epoch has the same length).
        self.total_steps: int | None = None
        self.steps_per_full_epoch: int | None = None
        self.samples_seen = 0

    # ----------------------------------------------------------------------------------------------------------
    # forward and losses

    def prepare_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Model inputs (and reconstruction targets): depth standardised per sample when enabled."""
        inputs = {task: batch[task] for task in self.in_domains}
        if self.standardize_depth and "depth" in batch:
            inputs["depth"] = truncated_depth_standardize(batch["depth"].float())
        return inputs

    def sample_losses(
        self, batch: Mapping[str, Tensor], *, mask_seeds: Tensor | None = None
    ) -> dict[str, SampleLoss]:
        """Masked forward pass; returns each output task's per-sample loss ``{task: SampleLoss((B,), (B,))}``."""
        targets = {**batch, **self.prepare_inputs(batch)}
        preds, masks = self.net(
            {task: targets[task] for task in self.in_domains},
            num_encoded_tokens=self.num_encoded_tokens,
            alphas=self.alphas,
            sample_tasks_uniformly=self.sample_tasks_uniformly,
            tie_break_noise=self.tie_break_noise,
            mask_seeds=mask_seeds,
            fp32_output_adapters=self.fp32_output_adapters,
        )
        out = {}
        for task, loss_fn in self.losses.items():
            source = TARGET_OF_TASK.get(task, task)
            mask = None if self.loss_on_unmasked else masks.get(source)
            out[task] = loss_fn(preds[task].float(), targets[source], mask)
        return out

    @staticmethod
    def sample_score(losses: Mapping[str, SampleLoss]) -> Tensor:
        """Per-sample difficulty (B,): the sum over tasks of each task's masked mean loss (0 if unmasked)."""
        return torch.stack([loss.value for loss in losses.values()]).sum(0)

    @torch.no_grad()
    def score_batch(self, batch: Mapping[str, Tensor], *, seed: int | None = None) -> Tensor:
        """Forward-only per-sample scores (B,), float32, for the teacher's scoring pass.

        With ``seed`` set, sample i's masks come from ``seed + index[i]``: its score does not depend on the batch
        it lands in, the rank that scores it, or the global RNG.
        """
        mask_seeds = None if seed is None else batch["index"].cpu() + seed
        return self.sample_score(self.sample_losses(batch, mask_seeds=mask_seeds)).float()

    # ----------------------------------------------------------------------------------------------------------
    # steps

    def train_mask_seeds(self, index: Tensor) -> Tensor:
        """Per-sample mask seeds (B,) for this epoch: a function of (mask_seed, epoch, index) only."""
        base = (self.mask_seed * 1_000_003 + self.current_epoch) * 1_000_033
        return (index.cpu() + base) % (2**63 - 1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        losses = self.sample_losses(batch, mask_seeds=self.train_mask_seeds(batch["index"]))
        task_losses = {task: reduce_batch(loss) for task, loss in losses.items()}
        weighted = self.task_balancer(task_losses)
        loss = torch.stack(list(weighted.values())).sum()
        nonfinite = not bool(torch.isfinite(loss))
        if self._trainer is not None:
            # Decided on every rank together: one rank raising alone would leave the others waiting in all-reduce.
            nonfinite = self.trainer.strategy.reduce_boolean_decision(nonfinite, all=False)
        if nonfinite:
            detail = ", ".join(f"{t}={v.item():.4g}" for t, v in task_losses.items())
            raise FloatingPointError(
                f"non-finite training loss at global step {self.global_step} (epoch {self.current_epoch}): "
                f"{detail}"
            )
        batch_size = batch["index"].shape[0]
        self.samples_seen += batch_size * self.trainer.world_size
        # The logged loss is the unweighted sum, as in the reference; backward uses the balanced one.
        self.log(
            "train/loss",
            torch.stack(list(task_losses.values())).sum(),
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch_size,
            sync_dist=True,
        )
        for task, value in task_losses.items():
            self.log(
                f"train/loss_{task}",
                value,
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
                sync_dist=True,
            )
        return {
            "loss": loss,
            "sample_loss": self.sample_score(losses).detach().float(),
            "index": batch["index"],
        }

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        losses = self.sample_losses(batch, mask_seeds=batch["index"].cpu() + self.val_mask_seed)
        task_losses = {task: reduce_batch(loss) for task, loss in losses.items()}
        batch_size = batch["index"].shape[0]
        self.log(
            "val/loss",
            torch.stack(list(task_losses.values())).sum(),
            prog_bar=True,
            batch_size=batch_size,
            sync_dist=True,
        )
        for task, value in task_losses.items():
            self.log(f"val/loss_{task}", value, batch_size=batch_size, sync_dist=True)

    # ----------------------------------------------------------------------------------------------------------
    # optimisation

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.compile_net:
            self.net.compile()  # in place: state_dict keys stay those of the reference

    def global_batch_size(self) -> int:
        per_device = self.trainer.datamodule.batch_size
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def base_lr(self) -> float:
        return self.blr * self.global_batch_size() / 256

    def planned_steps(self) -> tuple[int, int]:
        """(total optimizer steps, steps of one full epoch) for sizing the schedule."""
        total = self.total_steps
        if total is None:
            total = int(self.trainer.estimated_stepping_batches)
        per_epoch = self.steps_per_full_epoch
        if per_epoch is None:
            per_epoch = max(
                1, int(self.trainer.estimated_stepping_batches) // max(1, self.trainer.max_epochs)
            )
        return max(1, total), per_epoch

    def configure_optimizers(self) -> dict[str, Any]:
        no_decay = set(getattr(self.net, "no_weight_decay", lambda: set())())
        groups = param_groups_weight_decay(self.net, self.weight_decay, no_weight_decay_list=no_decay)
        balancer_params = [p for p in self.task_balancer.parameters() if p.requires_grad]
        if balancer_params:
            groups.append({"params": balancer_params, "weight_decay": 0.0})
        lr = self.base_lr()
        optimizer = self.optimizer_factory(groups, lr=lr)
        total, per_epoch = self.planned_steps()
        warmup = self.warmup_steps if self.warmup_steps is not None else round(self.warmup_epochs * per_epoch)
        log.info(
            "optimizer: lr %.3g (blr %.3g x batch %d / 256), %d steps, %d warmup",
            lr,
            self.blr,
            self.global_batch_size(),
            total,
            warmup,
        )
        lr_lambda = partial(_relative_lr, min_ratio=self.min_lr / lr, warmup_steps=warmup, total_steps=total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------------------------------
    # checkpoint state

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["samples_seen"] = self.samples_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.samples_seen = int(checkpoint.get("samples_seen", 0))


def _relative_lr(step: int, *, min_ratio: float, warmup_steps: int, total_steps: int) -> float:
    return warmup_cosine_lr(
        step, base_lr=1.0, min_lr=min_ratio, warmup_steps=warmup_steps, total_steps=total_steps
    )
