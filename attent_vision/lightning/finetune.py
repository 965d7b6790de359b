"""LightningModules that fine-tune a MultiViT on the downstream tasks: classification, segmentation, depth.

They share one optimisation recipe (timm's optimizer factory with layer-wise LR decay; per-step linear warmup then
cosine to ``min_lr``) and evaluate with dataset-level torchmetrics (``lightning.metrics``): every evaluation sample
counts once, also under DDP. Each task names its main metric (what checkpoints keep and sweeps optimise) and can
measure a chance level on the evaluation split, which the run prints beside its result.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import Tensor, nn

from attent_vision.lightning.metrics import (
    ClassificationMetrics,
    DepthMetrics,
    SegmentationMetrics,
    berhu_loss,
    depth_valid_mask,
)
from attent_vision.lightning.optim import (
    OptimizerFactory,
    build_optimizer,
    resume_trained_weights,
    scaled_lr,
    warmup_cosine_scheduler,
)
from attent_vision.models.attention import AttentionPath, configure_attention, use_fused_attention
from attent_vision.models.losses import truncated_depth_standardize

log = logging.getLogger(__name__)

__all__ = ["ClassificationModule", "DepthModule", "FinetuneModule", "SegmentationModule"]


def standardize_depth_input(depth: Tensor) -> Tensor:
    """Depth as a model input: truncated per-sample standardisation over the pixels with a reading; holes → 0.

    Args:
        depth: Metric depth (B, 1, H, W), 0 where there is no reading.
    """
    valid = depth > 0  # [B, 1, H, W]
    median = torch.nanmedian(torch.where(valid, depth, torch.nan).flatten(1), dim=1).values  # [B]
    median = torch.nan_to_num(median, nan=0.0).view(-1, 1, 1, 1)
    standardized = truncated_depth_standardize(torch.where(valid, depth, median))
    return torch.where(valid, standardized, torch.zeros_like(standardized))


class FinetuneModule(pl.LightningModule, ABC):
    """Fine-tuning recipe shared by the downstream tasks.

    Args:
        net: A :class:`~attent_vision.models.MultiViT` with one output adapter named ``task``.
        task: Output adapter (and target) name: "cls", "semseg" or "depth".
        inputs: Input modalities fed to the encoder.
        optimizer: The optimizer class with its fixed arguments (a Hydra ``_partial_`` node), called as
            ``optimizer(param_groups, lr=lr)``; default AdamW with torch's defaults.
        lr: Absolute learning rate; when None, ``blr × global batch / 256``.
        blr: Base learning rate used when ``lr`` is None.
        weight_decay: Weight decay (norms, biases, tokens and embeddings exempt).
        layer_decay: Layer-wise LR decay (None or 1.0 disables it).
        warmup_epochs: Linear warmup in epochs.
        min_lr: Learning rate at the last step.
        attention: Attention kernel: "auto" (per device and precision, ``attent_vision.models.attention``),
            "fused" (SDPA) or "math" (explicit softmax).
        compile: ``torch.compile`` the network in place when fitting (its state_dict keys stay the same).
    """

    main_metric: str = ""

    def __init__(
        self,
        *,
        net: nn.Module,
        task: str,
        inputs: Sequence[str] = ("rgb",),
        optimizer: OptimizerFactory | None = None,
        lr: float | None = None,
        blr: float = 5e-4,
        weight_decay: float = 0.05,
        layer_decay: float | None = 0.65,
        warmup_epochs: float = 5.0,
        min_lr: float = 1e-6,
        attention: AttentionPath = "auto",
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer"], logger=False)
        use_fused_attention(attention, device_type="cpu", precision="32-true")  # rejects a bad value now
        self.attention = attention
        self.compile_net = compile
        self.net = net
        if task not in (net.output_adapters or {}):
            raise ValueError(
                f"the network has no output adapter {task!r} (has {list(net.output_adapters or {})})"
            )
        self.task = task
        self.inputs = tuple(inputs)
        self.optimizer_factory = optimizer or torch.optim.AdamW
        self.lr, self.blr = lr, blr
        self.weight_decay, self.layer_decay = weight_decay, layer_decay
        self.warmup_epochs, self.min_lr = warmup_epochs, min_lr

    # ------------------------------------------------------------------------------------------------ forward

    def model_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: batch[name] for name in self.inputs}

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.net(self.model_inputs(batch))[self.task]

    @abstractmethod
    def loss(self, prediction: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """Training loss of a batch."""

    @abstractmethod
    def make_metrics(self) -> nn.Module:
        """A fresh dataset-level metric object (``update(pred, target)``, ``compute() -> dict``)."""

    @abstractmethod
    def target(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The evaluation target of a batch."""

    def on_fit_start(self) -> None:
        configure_attention(
            self.net, self.attention, device_type=self.device.type, precision=self.trainer.precision
        )

    def setup(self, stage: str) -> None:
        if not hasattr(self, "val_metrics"):
            self.val_metrics = self.make_metrics()
        if stage == "fit" and self.compile_net:
            self.net.compile()  # in place, as pretraining: state_dict keys stay those of the uncompiled network

    # ------------------------------------------------------------------------------------------------ steps

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(self(batch), batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss at global step {self.global_step} (epoch {self.current_epoch}); "
                "lower module.lr / module.blr or check the data"
            )
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["index"])
        )
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        prediction = self(batch)
        self.log(
            "val/loss", self.eval_loss(prediction, batch), sync_dist=True, batch_size=len(batch["index"])
        )
        self.val_metrics.update(self.metric_input(prediction), self.target(batch))

    def eval_loss(self, prediction: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return self.loss(prediction, batch)

    def metric_input(self, prediction: Tensor) -> Tensor:
        return prediction

    def on_validation_epoch_end(self) -> None:
        # compute() all-reduces the metric states, so every rank logs the same dataset-level values.
        values = {f"val/{name}": float(value) for name, value in self.val_metrics.compute().items()}
        main = f"val/{self.main_metric}"
        self.log_dict({k: v for k, v in values.items() if k != main})
        self.log(main, values[main], prog_bar=True)
        self.last_val_metrics = values
        self.last_val_epoch = self.current_epoch
        self.on_val_metrics(self.val_metrics)
        self.val_metrics.reset()

    def on_val_metrics(self, metrics: nn.Module) -> None:
        """Hook for tasks that keep more than the scalars (e.g. the confusion matrix)."""

    @torch.no_grad()
    def predict_batch(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Predictions for display: class ids, label maps or depth maps in metres."""
        return self.metric_input(self(batch))

    # ------------------------------------------------------------------------------------------------ chance

    @abstractmethod
    def chance_metrics(self, datamodule: Any) -> dict[str, Any]:
        """The main metric of a trivial predictor on the evaluation split, and how it was obtained."""

    # ------------------------------------------------------------------------------------------------ optimisation

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        resume_trained_weights(self._trainer, checkpoint)

    def global_batch_size(self) -> int:
        return (
            self.trainer.datamodule.batch_size
            * self.trainer.world_size
            * self.trainer.accumulate_grad_batches
        )

    def base_lr(self) -> float:
        return self.lr if self.lr is not None else scaled_lr(self.blr, self.global_batch_size())

    def configure_optimizers(self) -> dict[str, Any]:
        lr = self.base_lr()
        optimizer = build_optimizer(
            self.optimizer_factory,
            self.net,
            lr=lr,
            weight_decay=self.weight_decay,
            layer_decay=self.layer_decay,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = max(1, total // max(1, self.trainer.max_epochs))
        warmup = round(self.warmup_epochs * per_epoch)
        log.info(
            "optimizer: %s lr %.3g, layer decay %s, %d steps (%d warmup)",
            type(optimizer).__name__,
            lr,
            self.layer_decay,
            total,
            warmup,
        )
        scheduler = warmup_cosine_scheduler(
            optimizer, total_steps=total, warmup_steps=warmup, min_ratio=self.min_lr / lr
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class ClassificationModule(FinetuneModule):
    """Image classification with Mixup/CutMix and label smoothing from timm (reference ImageNet fine-tuning).

    Args:
        num_classes: Classes of the head (the dataset's real count).
        mixup: Mixup alpha (0 disables).
        cutmix: CutMix alpha (0 disables).
        mixup_prob: Probability of applying mixup or cutmix to a batch.
        mixup_switch_prob: Probability of cutmix instead of mixup when both are on.
        mixup_mode: "batch", "pair" or "elem".
        smoothing: Label smoothing.
        top_k: Accuracies to report.
        **kwargs: See :class:`FinetuneModule`.
    """

    main_metric = "top1"

    def __init__(
        self,
        *,
        num_classes: int,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: str = "batch",
        smoothing: float = 0.1,
        top_k: Sequence[int] = (1, 5),
        **kwargs: Any,
    ) -> None:
        super().__init__(task="cls", **kwargs)
        self.num_classes = num_classes
        self.top_k = tuple(top_k)
        self.mixup_fn = None
        if mixup > 0 or cutmix > 0:
            self.mixup_fn = Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                mode=mixup_mode,
                label_smoothing=smoothing,
                num_classes=num_classes,
            )
            self.train_criterion = SoftTargetCrossEntropy()  # smoothing already sits in the mixed targets
        elif smoothing > 0:
            self.train_criterion = LabelSmoothingCrossEntropy(smoothing=smoothing)
        else:
            self.train_criterion = nn.CrossEntropyLoss()

    def target(self, batch: Mapping[str, Tensor]) -> Tensor:
        return batch["label"]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.mixup_fn is not None:
            batch = dict(batch)
            batch["rgb"], batch["soft_label"] = self.mixup_fn(batch["rgb"], batch["label"])
        return super().training_step(batch, batch_idx)

    def loss(self, prediction: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        if "soft_label" in batch:
            return self.train_criterion(prediction, batch["soft_label"])
        return self.train_criterion(prediction, batch["label"])

    def eval_loss(self, prediction: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return F.cross_entropy(prediction.float(), batch["label"])

    def make_metrics(self) -> nn.Module:
        return ClassificationMetrics(num_classes=self.num_classes, top_k=self.top_k)

    def predict_batch(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self(batch).argmax(1)

    def chance_metrics(self, datamodule: Any) -> dict[str, Any]:
        targets = datamodule.val_targets()
        counts = torch.bincount(targets, minlength=self.num_classes)
        return {
            "top1": round(100.0 * float(counts.max()) / max(1, len(targets)), 2),
            "how": "always predicting the most frequent class of the evaluation split",
            "uniform_top1": round(100.0 / self.num_classes, 2),
        }


class SegmentationModule(FinetuneModule):
    """Semantic segmentation: per-pixel cross-entropy that ignores ``ignore_index`` (unlabeled and padding).

    Args:
        num_classes: Classes (after reduce-zero-label, 40 for NYUv2).
        ignore_index: Label value excluded from the loss and the metrics.
        **kwargs: See :class:`FinetuneModule`.
    """

    main_metric = "mIoU"

    def __init__(self, *, num_classes: int, ignore_index: int = 255, **kwargs: Any) -> None:
        super().__init__(task="semseg", **kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion_matrix: Tensor | None = None

    def model_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        inputs = super().model_inputs(batch)
        if "depth" in inputs:
            inputs["depth"] = standardize_depth_input(inputs["depth"])
        return inputs

    def target(self, batch: Mapping[str, Tensor]) -> Tensor:
        return batch["semseg"]

    def loss(self, prediction: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return F.cross_entropy(prediction.float(), batch["semseg"], ignore_index=self.ignore_index)

    def make_metrics(self) -> nn.Module:
        return SegmentationMetrics(num_classes=self.num_classes, ignore_index=self.ignore_index)

    def metric_input(self, prediction: Tensor) -> Tensor:
        return prediction.argmax(1)

    def on_val_metrics(self, metrics: nn.Module) -> None:
        self.confusion_matrix = metrics.confusion_matrix().detach().cpu()

    def chance_metrics(self, datamodule: Any) -> dict[str, Any]:
        counts = torch.zeros(self.num_classes + 1, dtype=torch.int64)
        targets = []
        for index, labels in datamodule.iter_val_targets():
            bad = (labels != self.ignore_index) & ((labels < 0) | (labels >= self.num_classes))
            if bad.any():
                from attent_vision.data.modalities import DataFormatError

                path = datamodule.val_set.sample_paths(index)["semseg"]
                raise DataFormatError(
                    f"{path}: label ids {sorted(set(labels[bad].unique().tolist()))} are outside "
                    f"[0, {self.num_classes}) after reduce_zero_label (data.num_classes={self.num_classes})"
                )
            kept = labels[labels != self.ignore_index]
            counts[: self.num_classes] += torch.bincount(kept.flatten(), minlength=self.num_classes)
            targets.append(labels)
        majority = int(counts[: self.num_classes].argmax())
        metrics = self.make_metrics()
        for labels in targets:
            metrics.update(torch.full_like(labels, majority)[None], labels[None])
        values = metrics.compute()
        return {
            "mIoU": round(float(values["mIoU"]), 2),
            "how": f"predicting the evaluation split's most frequent class ({majority}) at every pixel",
        }


class DepthModule(FinetuneModule):
    """Metric depth regression with the reverse Huber (berHu) loss over valid pixels (depth in (0, max_depth]).

    Args:
        loss_type: "berhu" (reference) or "l1".
        min_depth: Smallest valid depth in metres.
        max_depth: Largest valid depth in metres (10 for NYUv2).
        eigen_crop: Evaluate inside the standard NYUv2 Eigen crop only.
        **kwargs: See :class:`FinetuneModule`.
    """

    main_metric = "delta1"

    def __init__(
        self,
        *,
        loss_type: str = "berhu",
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        eigen_crop: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(task="depth", **kwargs)
        if loss_type not in ("berhu", "l1"):
            raise ValueError(f"loss_type must be 'berhu' or 'l1', got {loss_type!r}")
        self.loss_type = loss_type
        self.min_depth, self.max_depth = min_depth, max_depth
        self.eigen_crop = eigen_crop

    def target(self, batch: Mapping[str, Tensor]) -> Tensor:
        return batch["depth"]

    def loss(self, prediction: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        target = batch["depth"]
        valid = depth_valid_mask(target, min_depth=self.min_depth, max_depth=self.max_depth)
        prediction = prediction.float()
        if self.loss_type == "berhu":
            return berhu_loss(prediction, target, valid)
        diff = torch.where(valid, prediction - target, torch.zeros_like(prediction))
        return diff.abs().sum() / valid.sum().clamp_min(1)

    def make_metrics(self) -> nn.Module:
        return DepthMetrics(min_depth=self.min_depth, max_depth=self.max_depth, eigen_crop=self.eigen_crop)

    def metric_input(self, prediction: Tensor) -> Tensor:
        return prediction.float()

    def chance_metrics(self, datamodule: Any) -> dict[str, Any]:
        targets = [depth for _, depth in datamodule.iter_val_targets()]
        valid = torch.cat(
            [d[depth_valid_mask(d, min_depth=self.min_depth, max_depth=self.max_depth)] for d in targets]
        )
        if valid.numel() == 0:
            raise ValueError(
                "the evaluation split has no valid depth pixel (all 0 or beyond module.max_depth)"
            )
        median = float(valid.median())
        metrics = self.make_metrics()
        for depth in targets:
            metrics.update(torch.full_like(depth, median)[None], depth[None])
        values = metrics.compute()
        return {
            "delta1": round(float(values["delta1"]), 2),
            "rmse": round(float(values["rmse"]), 4),
            "how": f"predicting the evaluation split's median depth ({median:.2f} m) at every pixel",
        }


def describe_metrics(values: Mapping[str, float], names: Iterable[str]) -> str:
    """ "top1 83.2, top5 99.1" for the given names that are present."""
    return ", ".join(f"{name} {values[name]:.4g}" for name in names if name in values)
