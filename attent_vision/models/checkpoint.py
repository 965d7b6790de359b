"""Checkpoint I/O for MultiMAE: tolerant loading and the timm ViT converters (reference §5)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from attent_vision.models.pos_embed import resize_pos_embed

__all__ = ["load_multimae_weights", "multimae_to_timm_vit", "normalize_state_dict", "timm_vit_to_multimae"]

log = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LIGHTNING_PREFIX = "net."


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def normalize_state_dict(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """Extracts MultiMAE weights from a checkpoint object.

    Accepts a reference checkpoint (``{'model': state}``), a Lightning checkpoint (``{'state_dict': ...}`` whose
    model lives under ``net.``; other entries such as the balancer are dropped), or a plain state dict. Strips
    ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes, and converts timm ViT keys when it finds them.
    """
    if isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    elif isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    state = {_strip_wrappers(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if any(k.startswith(_LIGHTNING_PREFIX) for k in state):
        dropped = [k for k in state if not k.startswith(_LIGHTNING_PREFIX)]
        if dropped:
            log.info(
                "Ignoring %d checkpoint entries outside '%s': %s", len(dropped), _LIGHTNING_PREFIX, dropped
            )
        state = {
            _strip_wrappers(k[len(_LIGHTNING_PREFIX) :]): v
            for k, v in state.items()
            if k.startswith(_LIGHTNING_PREFIX)
        }
    if "cls_token" in state or any(k.startswith(("blocks.", "patch_embed.")) for k in state):
        log.info("Checkpoint has timm ViT keys; converting with timm_vit_to_multimae")
        state = timm_vit_to_multimae(state)
    return state


def _read_checkpoint(path: str | os.PathLike, weights_only: bool) -> Mapping[str, Any]:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: checkpoint holds objects that weights_only loading refuses; if you trust the file, pass "
            "weights_only=False"
        ) from err


def _adapt_shapes(
    state: dict[str, Tensor], target: Mapping[str, Tensor], strict: bool
) -> tuple[dict[str, Tensor], list[str]]:
    """Pads class embeddings by one row, resamples input-adapter pos_embs, drops other shape mismatches."""
    adapted, mismatched = {}, []
    for key, value in state.items():
        if key not in target or tuple(value.shape) == tuple(target[key].shape):
            adapted[key] = value
            continue
        want = tuple(target[key].shape)
        if key.endswith("class_emb.weight") and want == (value.shape[0] + 1, value.shape[1]):
            log.info("Padding %s from %d to %d rows (padding index)", key, value.shape[0], want[0])
            adapted[key] = F.pad(value, (0, 0, 0, 1))
        elif key.startswith("input_adapters.") and key.endswith("pos_emb") and value.shape[:2] == want[:2]:
            log.info("Resampling %s from %s to %s (bicubic)", key, tuple(value.shape[-2:]), want[-2:])
            adapted[key] = resize_pos_embed(value.float(), want[-2:], mode="bicubic").to(value.dtype)
        else:
            if strict:
                raise ValueError(
                    f"{key}: checkpoint shape {tuple(value.shape)} does not match model shape {want}"
                )
            log.warning("Skipping %s: checkpoint shape %s, model shape %s", key, tuple(value.shape), want)
            mismatched.append(key)
    return adapted, mismatched


def load_multimae_weights(
    model: nn.Module,
    state_or_path: Mapping[str, Any] | str | os.PathLike,
    *,
    strict: bool = False,
    weights_only: bool = True,
) -> tuple[list[str], list[str]]:
    """Loads MultiMAE (or timm ViT) weights into ``model``, tolerating the usual checkpoint variations.

    Args:
        model: The MultiMAE to fill.
        state_or_path: A checkpoint file, a checkpoint dict or a state dict (see :func:`normalize_state_dict`).
        strict: Require an exact key match (shape adaptations still apply).
        weights_only: Safe unpickling for files (argparse.Namespace allowed, for reference checkpoints); pass
            False only for trusted files holding other objects.

    Returns:
        (missing_keys, unexpected_keys); keys skipped for a shape mismatch count as missing.
    """
    obj = (
        _read_checkpoint(state_or_path, weights_only)
        if isinstance(state_or_path, str | os.PathLike)
        else state_or_path
    )
    state = normalize_state_dict(obj)
    state, mismatched = _adapt_shapes(state, model.state_dict(), strict)
    result = model.load_state_dict(state, strict=strict)
    missing = list(dict.fromkeys([*result.missing_keys, *mismatched]))
    unexpected = list(result.unexpected_keys)
    if missing:
        log.info("Missing keys (%d): %s", len(missing), missing)
    if unexpected:
        log.info("Unexpected keys (%d): %s", len(unexpected), unexpected)
    return missing, unexpected


def multimae_to_timm_vit(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Converts MultiMAE encoder weights to timm ``VisionTransformer`` keys (reference multimae2vit).

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
    """Converts timm ``VisionTransformer`` weights to MultiMAE keys (reference vit2multimae).

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
