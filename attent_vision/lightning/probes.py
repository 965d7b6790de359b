"""Frozen-encoder probes: k-NN and linear evaluation on encoder features computed once per run.

A probe measures what the pretrained encoder already represents, without the noise of fine-tuning it: the encoder
runs once over the training and evaluation splits (evaluation transforms only, so the features are a deterministic
function of the encoder), and a cheap readout is fitted on the cached features.

- :class:`KNNProbe` (classification): cosine similarity between L2-normalised pooled features and temperature-weighted
  votes of the k nearest training images, as in DINO's k-NN evaluation (k = 20, T = 0.07).
- :class:`LinearProbe`: a normalisation without affine parameters and a linear layer (MAE's linear probe), on the
  pooled feature (classification) or on every patch token, upsampled to the label size (segmentation, depth).

Both report the fine-tuning task's own metrics (``module.make_metrics()``), so results read like fine-tuning ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import trunc_normal_
from torch import Tensor, nn
from torch.utils.data import DataLoader

from attent_vision.lightning.finetune import ClassificationModule, DepthModule, FinetuneModule
from attent_vision.lightning.metrics import depth_valid_mask
from attent_vision.lightning.optim import warmup_cosine_lr
from attent_vision.models.heads import main_task_tokens, token_grid

__all__ = [
    "FeatureKind",
    "Features",
    "KNNProbe",
    "LinearProbe",
    "LinearProbeHead",
    "ProbeResult",
    "extract_features",
    "knn_votes",
]

log = logging.getLogger(__name__)

FeatureKind = Literal["pooled", "patch"]


@dataclass
class Features:
    """Frozen-encoder features of one split and their targets, in loader order (on the CPU).

    Attributes:
        features: Pooled features [N, D] or patch-token grids [N, D, h, w].
        targets: Class ids [N], label maps [N, H, W] or depth maps [N, 1, H, W].
    """

    features: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return len(self.features)

    def batches(self, batch_size: int, device: torch.device | str) -> Iterator[tuple[Tensor, Tensor]]:
        """(features, targets) batches in order, on ``device``, with the targets' full dtype restored."""
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            yield self.features[start:stop].to(device), _widen(self.targets[start:stop]).to(device)


@dataclass
class ProbeResult:
    """What a probe measured: the final metrics, per-epoch history (linear probe) and its costs."""

    final: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    trainable_params: int = 0
    fit_time_s: float = 0.0


def _narrow(targets: Tensor) -> Tensor:
    # Dense label maps are most of a cached split's memory: int16 holds any class id and the ignore index 255.
    if targets.dtype == torch.int64 and targets.ndim > 1:
        return targets.to(torch.int16)
    return targets


def _widen(targets: Tensor) -> Tensor:
    return targets.long() if targets.dtype == torch.int16 else targets


@torch.inference_mode()
def extract_features(
    module: FinetuneModule,
    loader: DataLoader,
    *,
    kind: FeatureKind,
    patch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    split: str = "train",
    log_every_s: float = 30.0,
) -> Features:
    """Runs the frozen encoder of ``module`` once over ``loader``.

    The encoder sees exactly what fine-tuning feeds it (``module.model_inputs``, e.g. standardised depth for RGB-D
    segmentation). ``pooled`` features are what the classification head pools (its ``pool``, e.g. the mean of every
    token); ``patch`` features are the main tasks' final patch tokens on their grid, channels concatenated across
    input modalities as the dense heads do.

    Args:
        module: Fine-tuning module whose ``net`` is the (pretrained or random) encoder; it is not changed.
        loader: Batches of the split, with evaluation transforms.
        kind: "pooled" ([N, D]) or "patch" ([N, D·T, h, w]).
        patch_size: Encoder patch size (sets the token grid).
        device: Where the encoder runs.
        autocast_dtype: Autocast dtype (bf16 on GPUs), None for full precision.
        split: Split name for the progress log.
        log_every_s: Seconds between progress lines.

    Returns:
        float32 features and the targets, on the CPU.
    """
    net = module.net
    if kind == "pooled" and not hasattr(net.output_adapters[module.task], "pool"):
        raise ValueError(
            f"the {module.task!r} head has no pool(): pooled features need the classification head"
        )
    features, targets = [], []
    total, done = len(loader.dataset), 0
    start = last_log = time.perf_counter()
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with autocast:
            tokens, info = net.forward_encoder(module.model_inputs(batch))  # [B, N + G, D]
            if kind == "pooled":
                feats = net.output_adapters[module.task].pool(tokens, info)  # [B, D]
            else:
                grid = token_grid(info, patch_size)
                patches = main_task_tokens(tokens, info, module.inputs, grid)  # [B, h·w, D·T]
                feats = rearrange(patches, "b (h w) d -> b d h w", h=grid[0], w=grid[1])
        features.append(feats.float().cpu())
        targets.append(_narrow(module.target(batch).cpu()))
        done += len(feats)
        now = time.perf_counter()
        if now - last_log >= log_every_s or done == total:
            rate = done / max(now - start, 1e-9)
            log.info(
                "probe features (%s): %d/%d images, %.1f images/s, %.0f s left",
                split,
                done,
                total,
                rate,
                (total - done) / max(rate, 1e-9),
            )
            last_log = now
    try:
        return Features(features=torch.cat(features), targets=torch.cat(targets))
    except RuntimeError as error:  # differently sized images in one split give differently sized grids
        raise ValueError(
            f"the {split} split's images differ in size after the evaluation transform; the probe caches one "
            f"feature tensor per split and needs equal sizes ({error})"
        ) from None


# ---------------------------------------------------------------------------------------------------------- k-NN


def knn_votes(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores of the weighted k-NN classifier of DINO's evaluation.

    Features are L2-normalised; each query's k most cosine-similar training samples vote for their class with
    weight ``exp(similarity / temperature)``, and a class's score is the sum of its votes.

    Args:
        train_features: Memory bank [N, D].
        train_labels: Class ids of the bank [N].
        query_features: Queries [Q, D].
        num_classes: Number of classes C.
        k: Neighbours per query (at most N are used).
        temperature: Vote temperature T.
        chunk_size: Queries per similarity matrix (bounds memory at chunk_size × N).

    Returns:
        Votes [Q, C] (float32).
    """
    bank = F.normalize(train_features.float(), dim=1)  # [N, D]
    labels = train_labels.long().to(bank.device)
    k = min(k, len(bank))
    scores = []
    for chunk in query_features.float().split(chunk_size):
        similarity = F.normalize(chunk.to(bank.device), dim=1) @ bank.T  # [q, N]
        top_similarity, top_index = similarity.topk(k, dim=1)  # [q, k]
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(len(chunk), num_classes, device=bank.device)
        scores.append(votes.scatter_add_(1, labels[top_index], weights))  # [q, C]
    return torch.cat(scores)


class KNNProbe:
    """Weighted k-NN classification on frozen pooled features (DINO's evaluation protocol).

    Args:
        k: Neighbours per query.
        temperature: Vote temperature (weight ``exp(cosine / T)``).
        chunk_size: Queries per similarity matrix.
    """

    name = "knn"

    def __init__(self, *, k: int = 20, temperature: float = 0.07, chunk_size: int = 1024) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.k, self.temperature, self.chunk_size = k, temperature, chunk_size

    def feature_kind(self, module: FinetuneModule) -> FeatureKind:
        if not isinstance(module, ClassificationModule):
            raise ValueError(f"the k-NN probe classifies; task {module.task!r} needs the linear probe")
        return "pooled"

    def fit_evaluate(
        self, train: Features, val: Features, *, module: FinetuneModule, device: torch.device
    ) -> ProbeResult:
        """Votes for every evaluation image from the training bank; the task's metrics (top-1, top-5) on them."""
        start = time.perf_counter()
        votes = knn_votes(
            train.features.to(device),
            train.targets,
            val.features,
            num_classes=module.num_classes,
            k=self.k,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
        )
        metrics = module.make_metrics().to(device)
        metrics.update(votes, val.targets.to(device))
        final = {name: float(value) for name, value in metrics.compute().items()}
        return ProbeResult(final=final, fit_time_s=time.perf_counter() - start)

    def settings(self) -> dict[str, Any]:
        return {"k": self.k, "temperature": self.temperature}


# ---------------------------------------------------------------------------------------------------------- linear


class LinearProbeHead(nn.Module):
    """Normalisation without affine parameters, then a linear layer (MAE's linear-probe head).

    On pooled features [B, D] it is BatchNorm1d + Linear; on patch grids [B, D, h, w] BatchNorm2d + a 1×1
    convolution (a linear layer per patch token), whose output is upsampled (bilinear) to the label size. The
    normalisation only rescales features per channel, so the readout stays linear in the frozen features; it
    makes one learning rate fit encoders whose feature scales differ.

    Args:
        dim: Feature width D.
        num_outputs: Classes, or 1 for depth.
        dense: Per-patch head on [B, D, h, w] instead of [B, D].
    """

    def __init__(self, *, dim: int, num_outputs: int, dense: bool = False) -> None:
        super().__init__()
        self.dense = dense
        norm = nn.BatchNorm2d if dense else nn.BatchNorm1d
        self.norm = norm(dim, affine=False, eps=1e-6)
        self.linear = nn.Conv2d(dim, num_outputs, kernel_size=1) if dense else nn.Linear(dim, num_outputs)
        trunc_normal_(self.linear.weight, std=0.01)  # MAE's linear-probe init
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Logits [B, C] or maps [B, C, H, W] at ``size`` (dense; default: the token grid)."""
        out = self.linear(self.norm(features))
        if self.dense and size is not None and tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
        return out


class LinearProbe:
    """Linear probe: :class:`LinearProbeHead` trained on cached frozen features, SGD with a cosine schedule.

    MAE trains its linear probe with LARS at batch 16384; LARS exists to make such huge batches trainable, and at
    ordinary batch sizes on normalised features plain SGD with momentum is the standard equivalent (the linear
    evaluations of MoCo v3 and DINO), so that is used: lr = ``blr`` × batch / 256 (MAE's scaling), linear warmup,
    cosine decay to ``min_lr``, no weight decay (MAE's setting). The loss is cross-entropy for classification
    (no label smoothing: MAE's probe uses none) and the fine-tuning module's own loss for dense tasks (cross-entropy
    with the ignore index, berHu on valid depth pixels). The reported metrics are those of the last epoch;
    ``best`` is kept as fine-tuning keeps it, for reference.

    Args:
        epochs: Passes over the cached training features.
        batch_size: Samples (images) per step.
        blr: Base learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        warmup_epochs: Linear warmup.
        min_lr: Learning rate at the last step.
        eval_every: Evaluate every this many epochs (and always after the last one).
        seed: Seeds the head's init and the batch order.
    """

    name = "linear"

    def __init__(
        self,
        *,
        epochs: int = 100,
        batch_size: int = 256,
        blr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_epochs: float = 10.0,
        min_lr: float = 0.0,
        eval_every: int = 10,
        seed: int = 0,
    ) -> None:
        if epochs < 1 or batch_size < 1 or eval_every < 1:
            raise ValueError(
                f"epochs, batch_size and eval_every must be >= 1, got {epochs}, {batch_size}, {eval_every}"
            )
        if blr <= 0:
            raise ValueError(f"blr must be > 0, got {blr}")
        self.epochs, self.batch_size, self.blr = epochs, batch_size, blr
        self.momentum, self.weight_decay = momentum, weight_decay
        self.warmup_epochs, self.min_lr = warmup_epochs, min_lr
        self.eval_every, self.seed = eval_every, seed

    @property
    def lr(self) -> float:
        return self.blr * self.batch_size / 256

    def feature_kind(self, module: FinetuneModule) -> FeatureKind:
        return "pooled" if isinstance(module, ClassificationModule) else "patch"

    def settings(self) -> dict[str, Any]:
        return {
            "optimizer": "sgd",
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "blr": self.blr,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "warmup_epochs": self.warmup_epochs,
            "min_lr": self.min_lr,
        }

    def build_head(self, module: FinetuneModule, train: Features) -> LinearProbeHead:
        dense = train.features.ndim == 4
        outputs = 1 if isinstance(module, DepthModule) else module.num_classes
        head = LinearProbeHead(dim=train.features.shape[1], num_outputs=outputs, dense=dense)
        if isinstance(module, DepthModule):
            # Start at the training split's median depth (the chance predictor): from a zero bias, berHu's
            # bounded gradients would spend hundreds of SGD steps just reaching the depth range.
            targets = _widen(train.targets)
            valid = depth_valid_mask(targets, min_depth=module.min_depth, max_depth=module.max_depth)
            if valid.any():
                nn.init.constant_(head.linear.bias, float(targets[valid].median()))
        return head

    def loss(self, module: FinetuneModule, prediction: Tensor, target: Tensor) -> Tensor:
        if isinstance(module, ClassificationModule):
            return F.cross_entropy(prediction.float(), target)
        return module.loss(prediction, {module.task: target})

    @torch.no_grad()
    def evaluate(
        self, head: LinearProbeHead, val: Features, *, module: FinetuneModule, device: torch.device
    ) -> dict[str, float]:
        head.eval()
        metrics = module.make_metrics().to(device)
        for features, target in val.batches(self.batch_size, device):
            prediction = head(features, size=target.shape[-2:] if head.dense else None)
            metrics.update(module.metric_input(prediction), target)
        return {name: float(value) for name, value in metrics.compute().items()}

    def fit_evaluate(
        self, train: Features, val: Features, *, module: FinetuneModule, device: torch.device
    ) -> ProbeResult:
        """Trains a fresh head on ``train`` and evaluates it on ``val``; the encoder is not involved."""
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            head = self.build_head(module, train).to(device)
        optimizer = torch.optim.SGD(
            head.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        # Full batches only: BatchNorm needs more than one sample, and the random order covers the rest.
        batch = min(self.batch_size, len(train))
        per_epoch = max(1, len(train) // batch)
        total = self.epochs * per_epoch
        warmup = round(self.warmup_epochs * per_epoch)
        history: list[dict[str, Any]] = []
        step = 0
        for epoch in range(self.epochs):
            head.train()
            order = torch.randperm(len(train), generator=generator)
            loss_sum, batches = torch.zeros((), device=device), 0
            for index in order[: per_epoch * batch].view(per_epoch, batch):
                lr = warmup_cosine_lr(
                    step, base_lr=self.lr, min_lr=self.min_lr, warmup_steps=warmup, total_steps=total
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                features = train.features[index].to(device)
                target = _widen(train.targets[index]).to(device)
                prediction = head(features, size=target.shape[-2:] if head.dense else None)
                loss = self.loss(module, prediction, target)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite linear-probe loss at epoch {epoch}; lower probe.method.blr"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()  # summed on the device: no host sync per step
                batches += 1
                step += 1
            if (epoch + 1) % self.eval_every == 0 or epoch + 1 == self.epochs:
                values = self.evaluate(head, val, module=module, device=device)
                history.append({"epoch": epoch, "train_loss": float(loss_sum) / batches, **values})
                log.info(
                    "linear probe epoch %d/%d: loss %.4f, %s %.2f",
                    epoch + 1,
                    self.epochs,
                    history[-1]["train_loss"],
                    module.main_metric,
                    values[module.main_metric],
                )
        trainable = sum(p.numel() for p in head.parameters() if p.requires_grad)
        final = {k: v for k, v in history[-1].items() if k not in ("epoch", "train_loss")}
        return ProbeResult(
            final=final, history=history, trainable_params=trainable, fit_time_s=time.perf_counter() - start
        )
