"""Input adapters: turn one modality into a sequence of tokens (MultiMAE's).

Adapters follow MultiMAE's two-step protocol: the constructor stores the modality settings, and
``init(dim_tokens)`` (called by :class:`~attent_vision.models.multimae.MultiMAE`) creates the parameters that
depend on the encoder width. Parameter names equal the reference's, so released checkpoints load as is.
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import to_2tuple, trunc_normal_
from torch import Tensor, nn

from attent_vision.models.pos_embed import build_2d_sincos_pos_embed, pos_embed_to_tokens

__all__ = ["PatchedInputAdapter", "SemSegInputAdapter"]


class _SpatialInputAdapter(nn.Module):
    """Shared geometry of the spatial adapters: effective patch size, token grid, positional embedding."""

    pos_emb_mode: str = "bicubic"

    def __init__(
        self,
        *,
        stride_level: int,
        patch_size_full: int | tuple[int, int],
        dim_tokens: int | None,
        sincos_pos_emb: bool,
        learnable_pos_emb: bool,
        image_size: int | tuple[int, int],
        modality: str | None,
    ) -> None:
        super().__init__()
        self.stride_level = stride_level
        self.patch_size_full = to_2tuple(patch_size_full)
        self.dim_tokens = dim_tokens
        self.sincos_pos_emb = sincos_pos_emb
        self.learnable_pos_emb = learnable_pos_emb
        self.image_size = to_2tuple(image_size)
        self.modality = modality
        # Actual patch size on this modality's (possibly strided) input.
        self.P_H = max(1, self.patch_size_full[0] // stride_level)
        self.P_W = max(1, self.patch_size_full[1] // stride_level)

    def build_pos_emb(self, dim_tokens: int) -> nn.Parameter:
        """Creates the (1, D, h, w) positional embedding for the default image size."""
        h = self.image_size[0] // (self.stride_level * self.P_H)
        w = self.image_size[1] // (self.stride_level * self.P_W)
        if self.sincos_pos_emb:
            return nn.Parameter(
                build_2d_sincos_pos_embed(h, w, dim_tokens), requires_grad=self.learnable_pos_emb
            )
        pos_emb = nn.Parameter(torch.zeros(1, dim_tokens, h, w))
        trunc_normal_(pos_emb, std=0.02)
        return pos_emb

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Validates an input of spatial size (height, width) and returns its (N_H, N_W) token grid."""
        if height % self.P_H or width % self.P_W:
            name = self.modality or type(self).__name__
            raise ValueError(
                f"{name}: input size {height}x{width} is not divisible by the effective patch size "
                f"{self.P_H}x{self.P_W} (patch {self.patch_size_full[0]}x{self.patch_size_full[1]} / stride "
                f"{self.stride_level})"
            )
        return height // self.P_H, width // self.P_W

    def add_pos_emb(self, x_patch: Tensor, grid: tuple[int, int]) -> Tensor:
        """Adds the positional embedding resampled to ``grid`` to (B, N, D) patch tokens."""
        return x_patch + pos_embed_to_tokens(self.pos_emb, grid, mode=self.pos_emb_mode)  # [B, N, D]

    def _require_init(self) -> None:
        if self.dim_tokens is None:
            raise RuntimeError(f"{type(self).__name__}: call init(dim_tokens) before forward")


class PatchedInputAdapter(_SpatialInputAdapter):
    """Patch tokens for dense inputs such as rgb or depth.

    Args:
        num_channels: Channels of the input map.
        stride_level: Input resolution relative to the full image (4 = a quarter of the size).
        patch_size_full: Patch size measured on the full image; the effective patch size is
            ``max(1, patch_size_full // stride_level)``.
        dim_tokens: Token width; when given, ``init`` runs immediately.
        sincos_pos_emb: Fixed 2-D sin-cos positional embedding (else trunc-normal).
        learnable_pos_emb: Whether the positional embedding is trained.
        image_size: Default full image size, sets the stored positional-embedding grid.
        modality: Name used in error messages (set by MultiMAE when omitted).
    """

    pos_emb_mode = "bicubic"

    def __init__(
        self,
        *,
        num_channels: int,
        stride_level: int = 1,
        patch_size_full: int | tuple[int, int] = 16,
        dim_tokens: int | None = None,
        sincos_pos_emb: bool = True,
        learnable_pos_emb: bool = False,
        image_size: int | tuple[int, int] = 224,
        modality: str | None = None,
    ) -> None:
        super().__init__(
            stride_level=stride_level,
            patch_size_full=patch_size_full,
            dim_tokens=dim_tokens,
            sincos_pos_emb=sincos_pos_emb,
            learnable_pos_emb=learnable_pos_emb,
            image_size=image_size,
            modality=modality,
        )
        self.num_channels = num_channels
        if dim_tokens is not None:
            self.init(dim_tokens)

    def init(self, dim_tokens: int = 768) -> None:
        """Creates ``pos_emb`` and the patch projection ``proj`` for tokens of width ``dim_tokens``."""
        self.dim_tokens = dim_tokens
        self.pos_emb = self.build_pos_emb(dim_tokens)
        self.proj = nn.Conv2d(
            self.num_channels, dim_tokens, kernel_size=(self.P_H, self.P_W), stride=(self.P_H, self.P_W)
        )

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this adapter) exempt from weight decay."""
        return {"pos_emb"}

    def forward(self, x: Tensor) -> Tensor:
        """Tokenises a (B, C, H, W) map into (B, N_H·N_W, D) tokens, row-major, with positions added."""
        self._require_init()
        grid = self.token_grid(*x.shape[-2:])
        x_patch = rearrange(self.proj(x), "b d nh nw -> b (nh nw) d")  # [B, N, D]
        return self.add_pos_emb(x_patch, grid)


class SemSegInputAdapter(_SpatialInputAdapter):
    """Tokens for integer semantic-segmentation maps: class embedding, then patch projection.

    Args:
        num_classes: Number of classes (one more row is added when ``emb_padding_idx`` is set).
        stride_level: Input resolution relative to the full image (4 in MultiMAE pretraining).
        patch_size_full: Patch size measured on the full image.
        dim_tokens: Token width; when given, ``init`` runs immediately.
        sincos_pos_emb: Fixed 2-D sin-cos positional embedding (else trunc-normal).
        learnable_pos_emb: Whether the positional embedding is trained.
        image_size: Default full image size, sets the stored positional-embedding grid.
        dim_class_emb: Width of the class embedding.
        interpolate_class_emb: Bilinear-downsample the embedded map and use a 1x1 projection instead of a
            patch convolution.
        emb_padding_idx: Padding index of the class embedding (e.g. image border), or None.
        modality: Name used in error messages (set by MultiMAE when omitted).
    """

    pos_emb_mode = "bilinear"

    def __init__(
        self,
        *,
        num_classes: int,
        stride_level: int = 4,
        patch_size_full: int | tuple[int, int] = 16,
        dim_tokens: int | None = None,
        sincos_pos_emb: bool = True,
        learnable_pos_emb: bool = False,
        image_size: int | tuple[int, int] = 224,
        dim_class_emb: int = 64,
        interpolate_class_emb: bool = False,
        emb_padding_idx: int | None = None,
        modality: str | None = None,
    ) -> None:
        super().__init__(
            stride_level=stride_level,
            patch_size_full=patch_size_full,
            dim_tokens=dim_tokens,
            sincos_pos_emb=sincos_pos_emb,
            learnable_pos_emb=learnable_pos_emb,
            image_size=image_size,
            modality=modality,
        )
        self.num_classes = num_classes + (1 if emb_padding_idx is not None else 0)
        self.dim_class_emb = dim_class_emb
        self.interpolate_class_emb = interpolate_class_emb
        self.emb_padding_idx = emb_padding_idx
        if dim_tokens is not None:
            self.init(dim_tokens)

    def init(self, dim_tokens: int = 768) -> None:
        """Creates ``pos_emb``, ``class_emb`` (trunc-normal 0.02) and ``proj`` for width ``dim_tokens``."""
        self.dim_tokens = dim_tokens
        self.pos_emb = self.build_pos_emb(dim_tokens)
        self.class_emb = nn.Embedding(self.num_classes, self.dim_class_emb, padding_idx=self.emb_padding_idx)
        trunc_normal_(self.class_emb.weight, std=0.02)
        if self.interpolate_class_emb:
            self.proj = nn.Sequential(
                nn.Upsample(scale_factor=(1 / self.P_H, 1 / self.P_W), mode="bilinear"),  # a downsample
                nn.Conv2d(self.dim_class_emb, dim_tokens, kernel_size=1),
            )
        else:
            self.proj = nn.Conv2d(
                self.dim_class_emb, dim_tokens, kernel_size=(self.P_H, self.P_W), stride=(self.P_H, self.P_W)
            )

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this adapter) exempt from weight decay (names that exist; the
        reference lists some names that match no parameter)."""
        return {"pos_emb", "class_emb.weight"}

    def forward(self, x: Tensor) -> Tensor:
        """Tokenises (B, H, W) integer labels into (B, N_H·N_W, D) tokens, row-major, with positions added."""
        self._require_init()
        if x.ndim != 3 or x.is_floating_point():
            name = self.modality or type(self).__name__
            raise ValueError(
                f"{name}: expected integer labels of shape (B, H, W), got {x.dtype} {tuple(x.shape)}"
            )
        grid = self.token_grid(*x.shape[-2:])
        x = rearrange(self.class_emb(x), "b h w c -> b c h w")  # [B, C_emb, H, W]
        x_patch = rearrange(self.proj(x), "b d nh nw -> b (nh nw) d")  # [B, N, D]
        return self.add_pos_emb(x_patch, grid)
