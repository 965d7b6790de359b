"""Downstream output adapters for fine-tuning (as in MultiMAE): linear classifier, ConvNeXt and DPT dense heads.

Every head is an ``nn.Module`` called as ``head(tokens_or_layers, input_info)``, where ``input_info`` gives the
per-task slices of the patch tokens (global tokens follow the patch tokens). Heads with ``needs_all_layers``
set receive the list of every encoder layer's output instead of the final tokens. Heads are fully built by
their constructor (no ``init(dim_tokens_enc)`` step) and keep their own initialisation: MultiViT attaches them
after the encoder's xavier re-init, so ``init_scale`` and trunc-normal inits take effect (the reference re-inits
the heads with xavier too, which undoes them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import trunc_normal_
from timm.models.convnext import ConvNeXtBlock
from torch import Tensor, nn

from attent_vision.models.output_adapters import InputInfo, default_norm_layer

__all__ = [
    "ConvNeXtHead",
    "DPTHead",
    "FeatureFusionBlock",
    "LinearHead",
    "ResidualConvUnit",
    "dpt_feature_dim",
    "dpt_hooks",
    "dpt_layer_dims",
]

POOLINGS = ("mean_all", "mean_patch", "global")


def _trunc_normal_linears(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def token_grid(input_info: InputInfo, patch_size: int) -> tuple[int, int]:
    height, width = input_info.image_size
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by the patch size {patch_size}")
    return height // patch_size, width // patch_size


def main_task_tokens(
    tokens: Tensor, input_info: InputInfo, main_tasks: Sequence[str], grid: tuple[int, int]
) -> Tensor:
    """Patch tokens of the main tasks concatenated along channels: [B, N+G, D] → [B, N_H·N_W, D·T]."""
    slices = []
    for task in main_tasks:
        info = input_info.tasks.get(task)
        if info is None:
            raise ValueError(f"main task {task!r} is not among the input tasks {list(input_info.tasks)}")
        if info.num_tokens != grid[0] * grid[1]:
            raise ValueError(
                f"main task {task!r} has {info.num_tokens} tokens, expected the {grid[0]}x{grid[1]} patch grid"
            )
        slices.append(tokens[:, info.start_idx : info.end_idx])  # [B, N, D]
    return torch.cat(slices, dim=-1)


# ---------------------------------------------------------------------------------------------- linear head


class LinearHead(nn.Module):
    """LayerNorm + Linear classifier on pooled encoder tokens (reference LinearOutputAdapter).

    Args:
        num_classes: Number of logits K.
        dim_tokens_enc: Encoder width D.
        pooling: 'mean_all' averages every token, global tokens included (what the reference does); 'mean_patch'
            averages the patch tokens only (timm's avg pool); 'global' takes the first global token.
        init_scale: Multiplier of the trunc-normal(0.02) head weight (the reference fine-tunes with 0.001).
    """

    needs_all_layers = False

    def __init__(
        self, *, num_classes: int, dim_tokens_enc: int, pooling: str = "mean_all", init_scale: float = 1.0
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; allowed: {list(POOLINGS)}")
        self.num_classes = num_classes
        self.pooling = pooling
        self.norm = default_norm_layer(dim_tokens_enc)
        self.head = nn.Linear(dim_tokens_enc, num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        with torch.no_grad():
            self.head.weight.mul_(init_scale)
        nn.init.zeros_(self.head.bias)

    def pool(self, tokens: Tensor, input_info: InputInfo) -> Tensor:
        """Pools final encoder tokens [B, N+G, D] to [B, D]."""
        num_global = input_info.num_global_tokens
        num_patch = tokens.shape[1] - num_global
        if self.pooling == "mean_all":
            return tokens.mean(dim=1)
        if self.pooling == "mean_patch":
            return tokens[:, :num_patch].mean(dim=1)
        if num_global < 1:
            raise ValueError("pooling='global' needs at least one global token")
        return tokens[:, num_patch]

    def forward(self, tokens: Tensor, input_info: InputInfo) -> Tensor:
        """Final encoder tokens [B, N+G, D] → logits [B, K]."""
        return self.head(self.norm(self.pool(tokens, input_info)))


# -------------------------------------------------------------------------------------------- ConvNeXt head


class ConvNeXtHead(nn.Module):
    """Dense prediction from the last encoder layer (reference ConvNeXtAdapter).

    The main tasks' patch tokens are concatenated along channels and projected to ``embed_dim``; every token
    then becomes a sqrt(ppp)×sqrt(ppp) block of ``embed_dim / ppp`` channels, refined by ConvNeXt blocks and
    classified per pixel, then interpolated to the full image size.

    Args:
        num_classes: Output channels (classes).
        dim_tokens_enc: Encoder width D.
        patch_size: Encoder patch size P on the full image.
        main_tasks: Input tasks whose tokens are decoded.
        embed_dim: Width after the token projection; default 8·D (6144 for ViT-B, the reference default).
        preds_per_patch: Sub-pixels per token (a square number).
        depth: Number of ConvNeXt blocks.
        interpolate_mode: Mode of the final resize to the image size.
    """

    needs_all_layers = False

    def __init__(
        self,
        *,
        num_classes: int,
        dim_tokens_enc: int,
        patch_size: int,
        main_tasks: Sequence[str] = ("rgb",),
        embed_dim: int | None = None,
        preds_per_patch: int = 16,
        depth: int = 4,
        interpolate_mode: str = "bilinear",
    ) -> None:
        super().__init__()
        embed_dim = 8 * dim_tokens_enc if embed_dim is None else embed_dim
        side = math.isqrt(preds_per_patch)
        if preds_per_patch < 1 or side * side != preds_per_patch:
            raise ValueError(
                f"preds_per_patch must be a square number (4, 16, 64, ...), got {preds_per_patch}"
            )
        if embed_dim % preds_per_patch:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by preds_per_patch {preds_per_patch}")
        if not main_tasks:
            raise ValueError("main_tasks must name at least one input task")
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.main_tasks = tuple(main_tasks)
        self.embed_dim = embed_dim
        self.preds_per_patch = preds_per_patch
        self.side = side
        self.class_dim = embed_dim // preds_per_patch
        self.interpolate_mode = interpolate_mode

        self.proj_dec = nn.Linear(dim_tokens_enc * len(self.main_tasks), embed_dim)
        # timm's block with ls_init_value=None has no layer scale, as in the reference block.
        self.blocks = nn.Sequential(
            *[ConvNeXtBlock(self.class_dim, ls_init_value=None, drop_path=0.0) for _ in range(depth)]
        )
        self.final_layer = nn.Conv2d(self.class_dim, num_classes, kernel_size=1)
        self.apply(_trunc_normal_linears)  # convolutions keep PyTorch's default init (reference)

    def forward(self, tokens: Tensor, input_info: InputInfo) -> Tensor:
        """Final encoder tokens [B, N+G, D] → logits [B, K, H, W]."""
        grid = token_grid(input_info, self.patch_size)
        x = main_task_tokens(tokens, input_info, self.main_tasks, grid)  # [B, N, D·T]
        x = self.proj_dec(x)  # [B, N, E]
        x = rearrange(
            x,
            "b (nh nw) (ph pw c) -> b c (nh ph) (nw pw)",
            nh=grid[0],
            nw=grid[1],
            ph=self.side,
            pw=self.side,
        )  # [B, E/ppp, N_H·s, N_W·s]
        x = self.final_layer(self.blocks(x))  # [B, K, N_H·s, N_W·s]
        align = False if self.interpolate_mode in ("bilinear", "bicubic") else None
        return F.interpolate(x, size=input_info.image_size, mode=self.interpolate_mode, align_corners=align)


# ------------------------------------------------------------------------------------------------- DPT head


def dpt_hooks(depth: int) -> list[int]:
    """Encoder layers read by DPT: the last block of each quarter (12 → [2, 5, 8, 11], 24 → [5, 11, 17, 23])."""
    if depth < 4:
        raise ValueError(f"DPT needs an encoder of at least 4 blocks, got {depth}")
    return [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]


def dpt_layer_dims(dim: int) -> list[int]:
    """Per-hook channels of DPT's reassemble stage (768 → [96, 192, 384, 768])."""
    return [dim // 8, dim // 4, dim // 2, dim]


def dpt_feature_dim(dim: int) -> int:
    """Width of DPT's fusion stage: 256 from ViT-B up, else about D/3 in multiples of 16, at least 32.

    Scaling with the encoder keeps the head from dwarfing small encoders (micro 128 → 48, tiny 192 → 64,
    small 384 → 128); a multiple of 16 keeps ``feature_dim // 2`` of the regression head integral.
    """
    return 256 if dim >= 768 else max(32, round(dim / 3 / 16) * 16)


class ResidualConvUnit(nn.Module):
    """ReLU → conv3×3 (→ BN) → ReLU → conv3×3 (→ BN), plus the input.

    Args:
        features: Channels.
        use_bn: Batch-normalise after each convolution (the convolutions then have no bias).
    """

    def __init__(self, *, features: int, use_bn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1, bias=not use_bn)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1, bias=not use_bn)
        self.bn1 = nn.BatchNorm2d(features) if use_bn else nn.Identity()
        self.bn2 = nn.BatchNorm2d(features) if use_bn else nn.Identity()
        self.act = nn.ReLU(inplace=False)  # in place would modify the residual input

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(self.act(x)))
        out = self.bn2(self.conv2(self.act(out)))
        return out + x


class FeatureFusionBlock(nn.Module):
    """DPT refinenet: adds a refined skip to the deeper path, refines, upsamples, projects with a 1×1 conv.

    Args:
        features: Channels.
        use_bn: Batch norm in the residual units.
    """

    def __init__(self, *, features: int, use_bn: bool = False) -> None:
        super().__init__()
        self.res_conf_unit1 = ResidualConvUnit(features=features, use_bn=use_bn)
        self.res_conf_unit2 = ResidualConvUnit(features=features, use_bn=use_bn)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(
        self, x: Tensor, skip: Tensor | None = None, *, size: tuple[int, int] | None = None
    ) -> Tensor:
        """Fuses x [B, F, h, w] with skip [B, F, h, w]; upsamples to ``size`` (default ×2)."""
        if skip is not None:
            x = x + self.res_conf_unit1(skip)
        x = self.res_conf_unit2(x)
        # An explicit size keeps odd token grids aligned with the next skip, where ×2 would be off by one.
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """Dense regression from four encoder layers (reference DPTOutputAdapter, regression head).

    Each hooked layer's main-task patch tokens form a [B, D·T, N_H, N_W] map (several main tasks are
    concatenated along channels and mixed by the first 1×1 conv, as in the reference), which is reassembled at
    4×, 2×, 1× and ½× the token resolution, fused coarse to fine, and regressed at 16× the token grid. The
    result is resized (bilinear) to the image size when the patch size is not 16.

    Args:
        num_outputs: Output channels (1 for depth).
        dim_tokens_enc: Encoder width D.
        patch_size: Encoder patch size P on the full image.
        encoder_depth: Number of encoder blocks L (the input list's length).
        hooks: Four sorted, distinct layer indices; default ``dpt_hooks(encoder_depth)``.
        layer_dims: Channels per hook; default ``dpt_layer_dims(dim_tokens_enc)``.
        feature_dim: Fusion width; default ``dpt_feature_dim(dim_tokens_enc)``.
        main_tasks: Input tasks whose tokens are decoded.
        use_bn: Batch norm in the fusion blocks' residual units.
    """

    needs_all_layers = True

    def __init__(
        self,
        *,
        num_outputs: int = 1,
        dim_tokens_enc: int,
        patch_size: int,
        encoder_depth: int,
        hooks: Sequence[int] | None = None,
        layer_dims: Sequence[int] | None = None,
        feature_dim: int | None = None,
        main_tasks: Sequence[str] = ("rgb",),
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        hooks = dpt_hooks(encoder_depth) if hooks is None else [int(h) for h in hooks]
        if (
            len(hooks) != 4
            or len(set(hooks)) != 4
            or hooks != sorted(hooks)
            or not all(0 <= h < encoder_depth for h in hooks)
        ):
            raise ValueError(
                f"DPT hooks must be 4 distinct, sorted layer indices in [0, {encoder_depth - 1}], got {hooks}"
            )
        layer_dims = dpt_layer_dims(dim_tokens_enc) if layer_dims is None else [int(d) for d in layer_dims]
        if len(layer_dims) != 4 or min(layer_dims) < 1:
            raise ValueError(f"layer_dims must be 4 positive channel counts, got {layer_dims}")
        feature_dim = dpt_feature_dim(dim_tokens_enc) if feature_dim is None else feature_dim
        if feature_dim < 2 or feature_dim % 2:
            raise ValueError(f"feature_dim must be even and at least 2, got {feature_dim}")
        if not main_tasks:
            raise ValueError("main_tasks must name at least one input task")
        self.num_outputs = num_outputs
        self.patch_size = patch_size
        self.encoder_depth = encoder_depth
        self.hooks = hooks
        self.layer_dims = layer_dims
        self.feature_dim = feature_dim
        self.main_tasks = tuple(main_tasks)

        in_dim = dim_tokens_enc * len(self.main_tasks)
        d0, d1, _, d3 = layer_dims
        resample = [
            nn.ConvTranspose2d(d0, d0, kernel_size=4, stride=4),  # 4× the token grid
            nn.ConvTranspose2d(d1, d1, kernel_size=2, stride=2),  # 2×
            nn.Identity(),  # 1×
            nn.Conv2d(d3, d3, kernel_size=3, stride=2, padding=1),  # ½×
        ]
        self.act_postprocess = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(in_dim, dim, kernel_size=1), up)
                for dim, up in zip(layer_dims, resample, strict=True)
            ]
        )
        self.layer_rn = nn.ModuleList(
            [nn.Conv2d(dim, feature_dim, kernel_size=3, padding=1, bias=False) for dim in layer_dims]
        )
        self.refinenets = nn.ModuleList(
            [FeatureFusionBlock(features=feature_dim, use_bn=use_bn) for _ in range(4)]
        )
        self.head = nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim // 2, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=True),
            nn.Conv2d(feature_dim // 2, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, num_outputs, kernel_size=1),
        )

    def forward(self, layers: Sequence[Tensor], input_info: InputInfo) -> Tensor:
        """Every encoder layer's output (L × [B, N+G, D]) → prediction [B, num_outputs, H, W]."""
        if isinstance(layers, Tensor) or len(layers) != self.encoder_depth:
            got = "one tensor" if isinstance(layers, Tensor) else f"{len(layers)} layers"
            raise ValueError(
                f"DPTHead needs the outputs of all {self.encoder_depth} encoder layers, got {got} "
                "(MultiViT passes them to heads with needs_all_layers=True)"
            )
        grid = token_grid(input_info, self.patch_size)
        feats = []
        for i, hook in enumerate(self.hooks):
            x = main_task_tokens(layers[hook], input_info, self.main_tasks, grid)  # [B, N, D·T]
            x = rearrange(x, "b (nh nw) c -> b c nh nw", nh=grid[0], nw=grid[1])
            feats.append(self.layer_rn[i](self.act_postprocess[i](x)))  # [B, F, h_i, w_i]
        path = self.refinenets[3](feats[3], size=feats[2].shape[-2:])
        path = self.refinenets[2](path, feats[2], size=feats[1].shape[-2:])
        path = self.refinenets[1](path, feats[1], size=feats[0].shape[-2:])
        path = self.refinenets[0](path, feats[0])  # [B, F, 8·N_H, 8·N_W]
        # The reference upsamples 2x here, which lands on the image size for patch 16 (8·N → 16·N); resampling
        # straight to the image size does the same there and keeps smaller patches from decoding at 2x the input.
        x = self.head[0](path)
        x = F.interpolate(x, size=tuple(input_info.image_size), mode="bilinear", align_corners=True)
        for layer in self.head[2:]:
            x = layer(x)
        return x  # [B, C, H, W]
