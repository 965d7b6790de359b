"""The transformer stacks shared by the encoder and the decoders: timm Blocks with linearly growing drop-path."""

from __future__ import annotations

from collections.abc import Callable

from timm.layers import calculate_drop_path_rates
from timm.models.vision_transformer import Block
from torch import nn


def transformer_blocks(
    *,
    dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
) -> nn.Sequential:
    """``depth`` pre-norm timm Blocks (keys ``<i>.norm1``, ``<i>.attn.qkv``, ... as in MultiMAE); stochastic depth
    rises linearly from 0 to ``drop_path_rate`` over the blocks (timm's ``calculate_drop_path_rates``)."""
    drop_paths = calculate_drop_path_rates(drop_path_rate, depth)
    return nn.Sequential(
        *[
            Block(
                dim=dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=drop_path,
                norm_layer=norm_layer,
            )
            for drop_path in drop_paths
        ]
    )
