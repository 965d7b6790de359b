"""LightningModule that pretrains MultiMAE and reports a loss per sample for the AtteNT teacher."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from attent_vision.data.modalities import MODALITIES, NORM_PIX_TASK, loss_target
from attent_vision.lightning.optim import (
    StepRemap,
    build_optimizer,
    resume_trained_weights,
    scaled_lr,
    warmup_cosine_scheduler,
)
from attent_vision.models.attention import AttentionPath, configure_attention, use_fused_attention
from attent_vision.models.losses import SampleLoss, default_loss, reduce_batch, truncated_depth_standardize
from attent_vision.seeds import item_seeds

log = logging.getLogger(__name__)


class MultiMAEPretrainModule(pl.LightningModule):
    """Masked multi-modal pretraining with the reference MultiMAE recipe.

    Training keeps the reference reduction (mean over samples per task, then task balancing). Every training
    step also returns each sample's score (the sum over tasks of its masked per-sample loss) with its dataset
    index, which is what the AtteNT teacher consumes. It meets the teacher's whole contract
    (``attent_vision.selection.contracts``): it scores (``score_batch``), takes per-sample loss weights
    (``set_sample_weights``) and sizes its LR schedule from the teacher's plan (``total_steps``,
    ``resize_schedule``).

    Loss weights (InfoBatch): with weights w set for the epoch, each task's loss is
    ``sum_i w_i * l_i / n`` over the batch's n samples that have masked pixels — the weights scale each
    sample's contribution and are not renormalised, so the epoch's summed loss ``sum_kept w_i * l_i`` has the
    full-data epoch's summed loss as its expectation over the random pruning (unbiased, as in InfoBatch).

    The network owns its masking (``net.masking``: token budget, Dirichlet alphas, ...) and which decoders run
    in fp32 (``net.fp32_output_adapters``); this module only chooses the per-sample mask seeds.

    Args:
        net: The MultiMAE network (``attent_vision.models.MultiMAE``).
        losses: Per-output-task per-sample losses that replace the defaults; tasks the network does not predict
            are dropped. An output task without one gets its modality's default loss from the registry
            (``attent_vision.data.modalities.MODALITIES``; ``attent_vision.models.losses.default_loss``).
        task_balancer: Weights the per-task losses (``NoTaskBalancer`` or ``UncertaintyTaskBalancer``).
        optimizer: Partial optimizer taking parameter groups and ``lr`` (default AdamW, betas 0.9/0.95).
        weight_decay: Decay for weights; norms, biases, tokens and embeddings are exempt.
        blr: Base learning rate; ``lr = blr * global_batch / 256``.
        min_lr: Learning rate reached at the last optimizer step.
        warmup_epochs: Linear warmup length in full epochs (ignored when ``warmup_steps`` is set).
        warmup_steps: Linear warmup length in optimizer steps.
        standardize_depth: Truncated per-sample depth standardisation (input and target).
        loss_on_unmasked: Compute the losses on every patch instead of the masked ones only.
        compile: ``torch.compile`` the network in place.
        attention: Attention kernel: "auto" (per device and precision, ``attent_vision.models.attention``),
            "fused" (SDPA) or "math" (explicit softmax).
        mask_seed: Training masks of sample i in epoch e come from the ``train_mask`` seed stream keyed by
            (mask_seed, e, i) (``attent_vision.seeds``): they vary across epochs and samples, differ from the
            sample's augmentation seed, and do not depend on the global RNG (so a resumed run, and any number of
            ranks, draw the same masks).
        val_mask_seed: Validation masks come from the ``val_mask`` stream keyed by (val_mask_seed, index): the
            same every epoch and, since it is not the run's seed, the same across runs, so val losses compare.
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        task_balancer: nn.Module,
        losses: Mapping[str, nn.Module] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        weight_decay: float = 0.05,
        blr: float = 1e-4,
        min_lr: float = 0.0,
        warmup_epochs: float = 40,
        warmup_steps: int | None = None,
        standardize_depth: bool = True,
        loss_on_unmasked: bool = False,
        compile: bool = False,
        attention: AttentionPath = "auto",
        mask_seed: int = 0,
        val_mask_seed: int = 1_000_003,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "losses", "task_balancer", "optimizer"], logger=False)
        self.net = net
        self.in_domains = list(net.input_adapters.keys())
        self.losses = nn.ModuleDict(_task_losses(net, losses or {}))
        self.task_balancer = task_balancer
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, betas=(0.9, 0.95))
        self.weight_decay = weight_decay
        self.blr, self.min_lr = blr, min_lr
        self.warmup_epochs, self.warmup_steps = warmup_epochs, warmup_steps
        self.standardize_depth = standardize_depth
        self.loss_on_unmasked = loss_on_unmasked
        self.compile_net = compile
        self.attention = attention
        use_fused_attention(attention, device_type="cpu", precision="32-true")  # rejects a bad value now
        self.mask_seed = mask_seed
        self.val_mask_seed = val_mask_seed
        # The exact optimizer-step count of the run; the AtteNT teacher sets it from its plan. When None,
        # Lightning's estimate is used (right only when every epoch has the same length).
        self.total_steps: int | None = None
        self.steps_per_full_epoch: int | None = None
        self.samples_seen = 0
        self._lr_remap: StepRemap | None = (
            None  # step -> LR schedule position; moves when the plan is resized
        )
        self._sample_weights: Tensor | None = None  # (M,) loss weight per dataset index for this epoch
        self._window_gradients_to_restore: dict[str, Tensor] | None = None  # see on_load_checkpoint

    # ----------------------------------------------------------------------------------------------------------
    # forward and losses

    def prepare_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Model inputs (and reconstruction targets): depth standardised per sample when enabled."""
        inputs = {task: batch[task] for task in self.in_domains}
        if self.standardize_depth and "depth" in batch:
            inputs["depth"] = truncated_depth_standardize(batch["depth"].float())
        return inputs

    def sample_losses(
        self,
        batch: Mapping[str, Tensor],
        *,
        mask_seeds: Tensor | None = None,
        tasks: Sequence[str] | None = None,
    ) -> dict[str, SampleLoss]:
        """Masked forward pass; returns each output task's per-sample loss ``{task: SampleLoss((B,), (B,))}``.

        With ``tasks`` given, only those tasks are decoded and scored (the others' decoders do not run).
        """
        targets = {**batch, **self.prepare_inputs(batch)}
        inputs = {task: targets[task] for task in self.in_domains}
        if tasks is None:  # net.forward: the path `compile` compiles
            preds, masks = self.net(inputs, mask_seeds)
        else:
            features = self.net.forward_features(inputs, mask_seeds)
            preds, masks = self.net.decode(features, self._known_tasks(tasks)), features.masks.task_masks
        out = {}
        for task in [t for t in self.losses if t in preds]:  # the losses' order: sums stay bit-identical
            source = loss_target(task)
            mask = None if self.loss_on_unmasked else masks.get(source)
            out[task] = self.losses[task](preds[task].float(), targets[source], mask)
        return out

    def _known_tasks(self, tasks: Sequence[str]) -> list[str]:
        unknown = [t for t in tasks if t not in self.losses]
        if unknown:
            raise ValueError(
                f"scoring.tasks: {unknown} are not output tasks of the model; allowed: {list(self.losses)}"
            )
        return [t for t in self.losses if t in tasks]  # the losses' order, as in training

    @staticmethod
    def sample_score(losses: Mapping[str, SampleLoss]) -> Tensor:
        """Per-sample difficulty (B,): the sum over tasks of each task's masked mean loss (0 if unmasked)."""
        return torch.stack([loss.value for loss in losses.values()]).sum(0)

    @torch.no_grad()
    def score_batch(
        self, batch: Mapping[str, Tensor], *, seed: int | None = None, tasks: Sequence[str] | None = None
    ) -> Tensor:
        """Forward-only per-sample scores (B,), float32, for the teacher's scoring pass.

        With ``seed`` set, sample i's masks come from the ``score_mask`` seed stream keyed by (seed, index[i]):
        its score does not depend on the batch it lands in, the rank that scores it, or the global RNG. With
        ``tasks`` set, the score sums those tasks only and the other decoders do not run.
        """
        mask_seeds = None if seed is None else item_seeds("score_mask", seed, index=batch["index"])
        return self.sample_score(self.sample_losses(batch, mask_seeds=mask_seeds, tasks=tasks)).float()

    # ----------------------------------------------------------------------------------------------------------
    # steps

    def train_mask_seeds(self, index: Tensor) -> Tensor:
        """Per-sample mask seeds (B,) for this epoch: a function of (mask_seed, epoch, index) only."""
        return item_seeds("train_mask", self.mask_seed, self.current_epoch, index=index)

    def set_sample_weights(self, weights: Tensor | None) -> None:
        """(M,) loss weight per dataset index for the coming epoch (None: every sample weighs 1)."""
        self._sample_weights = None if weights is None else weights.detach().float().cpu()

    def batch_weights(self, index: Tensor) -> Tensor | None:
        if self._sample_weights is None:
            return None
        return self._sample_weights[index.cpu()].to(self.device)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        losses = self.sample_losses(batch, mask_seeds=self.train_mask_seeds(batch["index"]))
        weights = self.batch_weights(batch["index"])
        task_losses = {task: weighted_task_loss(loss, weights) for task, loss in losses.items()}
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
        # The logged loss is the sum over tasks without task balancing, as in the reference (with sample
        # weights, it is InfoBatch's unbiased estimate of the full-data loss); backward uses the balanced one.
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

    def val_mask_seeds(self, index: Tensor) -> Tensor:
        """Per-sample validation mask seeds (B,): a function of (val_mask_seed, index) only, the same every epoch."""
        return item_seeds("val_mask", self.val_mask_seed, index=index)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        losses = self.sample_losses(batch, mask_seeds=self.val_mask_seeds(batch["index"]))
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

    def on_fit_start(self) -> None:
        configure_attention(
            self.net, self.attention, device_type=self.device.type, precision=self.trainer.precision
        )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.compile_net:
            self.net.compile()  # in place: state_dict keys stay those of the reference

    def global_batch_size(self) -> int:
        per_device = self.trainer.datamodule.batch_size
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def base_lr(self) -> float:
        return scaled_lr(self.blr, self.global_batch_size())

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
        balancer_params = [p for p in self.task_balancer.parameters() if p.requires_grad]
        lr = self.base_lr()
        optimizer = build_optimizer(
            self.optimizer_factory,
            self.net,
            lr=lr,
            weight_decay=self.weight_decay,
            extra_groups=[{"params": balancer_params, "weight_decay": 0.0}] if balancer_params else [],
        )
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
        self._lr_remap = StepRemap(total)
        scheduler = warmup_cosine_scheduler(
            optimizer,
            total_steps=total,
            warmup_steps=warmup,
            min_ratio=self.min_lr / lr,
            remap=self._lr_remap,
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def resize_schedule(self, total_steps: int, *, at_step: int) -> None:
        """The plan now has ``total_steps`` steps (InfoBatch's epochs are sized when their scores are known): the
        schedule positions still ahead are spread over the steps still ahead, so the last step reaches min_lr."""
        self.total_steps = total_steps
        if self._lr_remap is not None:
            self._lr_remap.resize(total_steps, at_step=at_step)

    # ----------------------------------------------------------------------------------------------------------
    # checkpoint state

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["samples_seen"] = self.samples_seen
        gradients = self._window_gradients()
        if gradients is not None:
            checkpoint["window_gradients"] = gradients

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.samples_seen = int(checkpoint.get("samples_seen", 0))
        resume_trained_weights(self._trainer, checkpoint)
        self._window_gradients_to_restore = checkpoint.get("window_gradients")

    def on_train_start(self) -> None:
        # Set here, after the Trainer zeroes every gradient before fitting. Lightning then zeroes them only as an
        # accumulation window starts, so the resumed batches of this window add to them.
        gradients, self._window_gradients_to_restore = self._window_gradients_to_restore, None
        parameters = dict(self.named_parameters())
        for name, gradient in (gradients or {}).items():
            parameters[name].grad = gradient.to(parameters[name].device)

    def _window_gradients(self) -> dict[str, Tensor] | None:
        """The gradients of an unfinished accumulation window (a stop or crash checkpoint between its batches), so
        that the resumed run steps on the whole window. One process only: under DDP they are each rank's own until
        the window's last batch, and the resumed step then lacks the batches trained before the checkpoint."""
        trainer = self._trainer
        if trainer is None or trainer.accumulate_grad_batches == 1 or trainer.world_size != 1:
            return None
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if processed % trainer.accumulate_grad_batches == 0:
            return None
        return {name: p.grad.detach() for name, p in self.named_parameters() if p.grad is not None}


def _task_losses(net: nn.Module, losses: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """One loss per output task of ``net``: the configured one, else the registry default of its modality.

    Ordered as the registry (rgb, depth, semseg, then norm_rgb), whatever the configured or token order, so the
    per-task sums always add up in the same order.
    """
    outputs = net.output_adapters
    known = [t for t in [*MODALITIES, NORM_PIX_TASK] if t in outputs]
    ordered = known + [t for t in outputs if t not in known]
    missing = [t for t in ordered if t not in losses and loss_target(t) not in MODALITIES]
    if missing:
        raise ValueError(f"model.losses has no loss for the output task(s) {missing}")
    chosen = {}
    for task in ordered:
        if task in losses:
            chosen[task] = losses[task]
        else:
            adapter = outputs[task]
            chosen[task] = default_loss(
                task, patch_size=adapter.patch_size_full[0], stride=adapter.stride_level
            )
    return chosen


def weighted_task_loss(loss: SampleLoss, weights: Tensor | None) -> Tensor:
    """The reference's batch reduction (mean over samples with masked pixels), each sample's value scaled by its
    weight; the denominator stays the sample count, so the weights are not renormalised away."""
    if weights is None:
        return reduce_batch(loss)
    has_pixels = (loss.count > 0).to(loss.value.dtype)
    return (loss.value * weights.to(loss.value.dtype) * has_pixels).sum() / has_pixels.sum().clamp_min(1.0)
