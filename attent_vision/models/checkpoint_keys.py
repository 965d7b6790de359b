"""Converters between MultiMAE's encoder keys and timm's ``VisionTransformer`` keys (as the original MultiMAE's
``multimae2vit`` / ``vit2multimae``)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from einops import rearrange
from torch import Tensor

__all__ = ["is_timm_vit", "multimae_to_timm_vit", "timm_vit_to_multimae"]


def is_timm_vit(keys: Iterable[str]) -> bool:
    """Whether a state dict's keys are timm ViT keys (a cls token, ``blocks.*`` or ``patch_embed.*``)."""
    keys = list(keys)
    return "cls_token" in keys or any(k.startswith(("blocks.", "patch_embed.")) for k in keys)


def multimae_to_timm_vit(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Converts MultiMAE encoder weights to timm ``VisionTransformer`` keys (as the original MultiMAE's
    ``multimae2vit``).

    ``global_tokens`` → ``cls_token``; the rgb pos_emb (1, D, h, w) → ``pos_embed`` (1, 1 + h·w, D) row-major with a
    zero row for the cls position; the rgb patch projection → ``patch_embed.proj``; ``encoder.*`` → ``blocks.*``.
    Everything else is dropped; the result has no ``norm``/``head`` (MultiMAE has no final LayerNorm).
    """
    global_tokens = state["global_tokens"]
    if global_tokens.shape[1] != 1:
        raise ValueError(
            f"timm ViT has one cls token; this checkpoint has {global_tokens.shape[1]} global tokens"
        )
    pos = rearrange(state["input_adapters.rgb.pos_emb"], "1 d h w -> 1 (h w) d")  # [1, N, D]
    out = {
        "cls_token": global_tokens,
        "pos_embed": torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1),  # [1, 1 + N, D]
        "patch_embed.proj.weight": state["input_adapters.rgb.proj.weight"],
        "patch_embed.proj.bias": state["input_adapters.rgb.proj.bias"],
    }
    out.update({"blocks." + k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")})
    return out


def timm_vit_to_multimae(
    state: Mapping[str, Tensor], *, grid_size: tuple[int, int] | None = None
) -> dict[str, Tensor]:
    """Converts timm ``VisionTransformer`` weights to MultiMAE keys (as the original MultiMAE's
    ``vit2multimae``).

    ``cls_token + pos_embed[:, 0]`` → ``global_tokens`` (a new tensor; the source is not modified);
    ``pos_embed[:, 1:]`` → ``input_adapters.rgb.pos_emb`` (1, D, h, w); ``patch_embed.proj`` → the rgb
    projection; ``blocks.*`` → ``encoder.*``. ``norm``, ``fc_norm`` and ``head`` are dropped.

    Args:
        state: timm state dict.
        grid_size: Patch grid (h, w) of ``pos_embed``; square when omitted.
    """
    pos = state["pos_embed"]  # [1, P + N, D]
    has_cls = "cls_token" in state
    if grid_size is not None:
        h, w = grid_size
        num_prefix = pos.shape[1] - h * w
    else:
        num_prefix = 1 if has_cls and math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1 else 0
        h = w = math.isqrt(pos.shape[1] - num_prefix)
    if h * w != pos.shape[1] - num_prefix or num_prefix not in (0, 1):
        raise ValueError(f"pos_embed of {pos.shape[1]} positions does not fit a square grid; pass grid_size")
    out = {}
    if has_cls:
        cls_pos = pos[:, :1] if num_prefix else 0.0
        out["global_tokens"] = state["cls_token"] + cls_pos  # out of place: no aliasing of the source
    out["input_adapters.rgb.pos_emb"] = rearrange(
        pos[:, num_prefix:], "1 (h w) d -> 1 d h w", h=h, w=w
    ).contiguous()
    out["input_adapters.rgb.proj.weight"] = state["patch_embed.proj.weight"]
    out["input_adapters.rgb.proj.bias"] = state["patch_embed.proj.bias"]
    out.update({"encoder." + k[len("blocks.") :]: v for k, v in state.items() if k.startswith("blocks.")})
    return out
