"""Fixed 2-D sin-cos positional embeddings and their resampling.

The layout reproduces MultiMAE's ``build_2d_sincos_posemb`` (itself from MoCo-v3) exactly, so generated
embeddings equal the ones stored in the released checkpoints.
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import resample_abs_pos_embed
from torch import Tensor

__all__ = ["build_2d_sincos_pos_embed", "pos_embed_to_tokens", "resize_pos_embed"]


def build_2d_sincos_pos_embed(h: int, w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """Builds MultiMAE's fixed 2-D sin-cos positional embedding.

    The reference builds ``meshgrid(arange(w), arange(h))`` with 'ij' indexing, flattens it in (w h) order and
    reads the result back as (h w). On a square grid the channels at (row r, col c) are therefore
    ``[sin(r·ω), cos(r·ω), sin(c·ω), cos(c·ω)]`` with ``ω_k = temperature^(-k / (dim/4))``. On a non-square grid
    the positions are scrambled exactly as in the reference (only square base grids are meaningful).

    Args:
        h: Grid height (number of patch rows).
        w: Grid width (number of patch columns).
        dim: Embedding dimension, divisible by 4.
        temperature: Frequency base.

    Returns:
        Tensor of shape (1, dim, h, w), float32.
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos positional embedding needs dim divisible by 4, got {dim}")
    grid_a, grid_b = torch.meshgrid(
        torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij"
    )  # [w, h] each
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)  # [D/4]
    out_a = torch.outer(grid_a.flatten(), omega)  # [(w h), D/4]
    out_b = torch.outer(grid_b.flatten(), omega)  # [(w h), D/4]
    emb = torch.cat([out_a.sin(), out_a.cos(), out_b.sin(), out_b.cos()], dim=1)  # [(w h), D]
    # The reference reinterprets the (w h) flattening as (h w): kept on purpose.
    return rearrange(emb, "(h w) d -> 1 d h w", h=h, w=w)


def resize_pos_embed(
    pos_emb: Tensor, size: tuple[int, int], *, mode: str = "bicubic", antialias: bool = False
) -> Tensor:
    """Resamples a (1, D, h, w) positional embedding to (1, D, *size).

    Uses timm's ``resample_abs_pos_embed`` (float32 interpolation, align_corners False). ``antialias`` is off
    by default to match MultiMAE's plain ``F.interpolate``.

    Args:
        pos_emb: Embedding of shape (1, D, h, w).
        size: Target (height, width).
        mode: 'bicubic' (patched inputs, checkpoints) or 'bilinear' (semseg input, decoders).
        antialias: Anti-alias when downsampling.

    Returns:
        Tensor of shape (1, D, size[0], size[1]); the input itself when the size already matches.
    """
    h, w = pos_emb.shape[-2:]
    if (h, w) == tuple(size):
        return pos_emb
    tokens = rearrange(pos_emb, "1 d h w -> 1 (h w) d")
    tokens = resample_abs_pos_embed(
        tokens,
        new_size=list(size),
        old_size=[h, w],
        num_prefix_tokens=0,
        interpolation=mode,
        antialias=antialias,
    )
    return rearrange(tokens, "1 (h w) d -> 1 d h w", h=size[0], w=size[1])


def pos_embed_to_tokens(pos_emb: Tensor, size: tuple[int, int], *, mode: str = "bicubic") -> Tensor:
    """Resamples a (1, D, h, w) embedding to ``size`` and flattens it row-major to (1, N, D)."""
    return rearrange(resize_pos_embed(pos_emb, size, mode=mode), "1 d h w -> 1 (h w) d")
