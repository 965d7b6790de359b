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


def multimae_to_timm_vit(state: Mapping[str, Tensor], *, no_embed_class: bool = False) -> dict[str, Tensor]:
    """Converts MultiMAE encoder weights to timm ``VisionTransformer`` keys (as the original MultiMAE's
    ``multimae2vit``).

    ``global_tokens`` → ``cls_token``; the rgb pos_emb (1, D, h, w) → ``pos_embed`` (1, 1 + h·w, D) row-major with a
    zero row for the cls position; the rgb patch projection → ``patch_embed.proj``; ``encoder.*`` → ``blocks.*``.
    Everything else is dropped; the result has no ``norm``/``head`` (MultiMAE has no final LayerNorm).

    Args:
        state: MultiMAE keys (at least the rgb input adapter, ``global_tokens`` and ``encoder.*``).
        no_embed_class: For timm's ``no_embed_class=True``: ``pos_embed`` covers the patches only (1, h·w, D), as
            MultiMAE's global tokens have no position, and global tokens beyond the first become timm's
            ``reg_token`` (``reg_tokens=G - 1``). False is the release's layout (one global token, zero cls row).
    """
    global_tokens = state["global_tokens"]
    if global_tokens.shape[1] != 1 and not no_embed_class:
        raise ValueError(
            f"timm ViT has one cls token; this checkpoint has {global_tokens.shape[1]} global tokens"
        )
    pos = rearrange(state["input_adapters.rgb.pos_emb"], "1 d h w -> 1 (h w) d")  # [1, N, D]
    if not no_embed_class:
        pos = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)  # [1, 1 + N, D]
    out = {
        "cls_token": global_tokens[:, :1],
        "pos_embed": pos.contiguous(),
        "patch_embed.proj.weight": state["input_adapters.rgb.proj.weight"],
        "patch_embed.proj.bias": state["input_adapters.rgb.proj.bias"],
    }
    if global_tokens.shape[1] > 1:
        out["reg_token"] = global_tokens[:, 1:]
    out.update({"blocks." + k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")})
    return out


def timm_vit_to_multimae(
    state: Mapping[str, Tensor], *, grid_size: tuple[int, int] | None = None
) -> dict[str, Tensor]:
    """Converts timm ``VisionTransformer`` weights to MultiMAE keys (as the original MultiMAE's
    ``vit2multimae``).

    ``cls_token + pos_embed[:, 0]`` → ``global_tokens`` (a new tensor; the source is not modified), followed by
    any ``reg_token`` (plus their positions, if ``pos_embed`` has them); the patch rows of ``pos_embed`` →
    ``input_adapters.rgb.pos_emb`` (1, D, h, w); ``patch_embed.proj`` → the rgb projection; ``blocks.*`` →
    ``encoder.*``. ``norm``, ``fc_norm`` and ``head`` are dropped.

    Args:
        state: timm state dict.
        grid_size: Patch grid (h, w) of ``pos_embed``; square when omitted.
    """
    pos = state["pos_embed"]  # [1, P + N, D]
    prefix = [state[k] for k in ("cls_token", "reg_token") if k in state]  # [1, 1, D], [1, R, D]
    num_tokens = sum(t.shape[1] for t in prefix)
    if grid_size is not None:
        h, w = grid_size
        num_prefix = pos.shape[1] - h * w
    else:
        rest = pos.shape[1] - num_tokens
        square = rest > 0 and math.isqrt(rest) ** 2 == rest
        num_prefix = num_tokens if num_tokens and square else 0
        h = w = math.isqrt(pos.shape[1] - num_prefix)
    if h * w != pos.shape[1] - num_prefix or num_prefix not in (0, num_tokens):
        raise ValueError(f"pos_embed of {pos.shape[1]} positions does not fit a square grid; pass grid_size")
    out = {}
    if prefix:
        tokens = torch.cat(prefix, dim=1)
        # Out of place: no aliasing of the source. no_embed_class=True checkpoints have no prefix positions.
        out["global_tokens"] = tokens + pos[:, :num_prefix] if num_prefix else tokens.clone()
    out["input_adapters.rgb.pos_emb"] = rearrange(
        pos[:, num_prefix:], "1 (h w) d -> 1 d h w", h=h, w=w
    ).contiguous()
    out["input_adapters.rgb.proj.weight"] = state["patch_embed.proj.weight"]
    out["input_adapters.rgb.proj.bias"] = state["patch_embed.proj.bias"]
    out.update({"encoder." + k[len("blocks.") :]: v for k, v in state.items() if k.startswith("blocks.")})
    return out
