"""Hydra resolvers and start-up validation of the composed config.

Every check here runs before any data is generated or any model is built, so a bad value fails in the first
second with a message that names the config key, the value and what was expected.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _auto_precision() -> str:
    # bf16 autocast on GPUs; fp32 on CPUs, where bf16 speed depends on the processor's bf16 support
    # (bench/pretrain_throughput.py measures it; opt in with trainer.precision=bf16-mixed).
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def _token_fraction(modalities: list[str], input_size: int, patch_size: int, denominator: int) -> int:
    # MultiMAE encodes 1/6 of the tokens (98 of 588 at 224 px / patch 16); keep that share at any size.
    total = count_input_tokens(
        modalities=list(modalities), input_size=int(input_size), patch_size=int(patch_size)
    )
    return max(1, total // int(denominator))


def register_resolvers() -> None:
    """Register the project's OmegaConf resolvers (idempotent)."""
    if not OmegaConf.has_resolver("auto_precision"):
        OmegaConf.register_new_resolver("auto_precision", _auto_precision)
    if not OmegaConf.has_resolver("token_fraction"):
        OmegaConf.register_new_resolver("token_fraction", _token_fraction)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def count_input_tokens(*, modalities: list[str], input_size: int, patch_size: int) -> int:
    """Tokens the encoder would see unmasked: every modality gives (input_size / patch_size)^2 patches."""
    return len(modalities) * (input_size // patch_size) ** 2


def validate_pretrain_config(cfg: DictConfig) -> None:
    """Fail fast on values that would otherwise crash deep inside training or silently misbehave."""
    data, model = cfg.data, cfg.model
    modalities = list(data.modalities)
    known = {"rgb", "depth", "semseg"}
    _require(len(modalities) > 0, "data.modalities", "needs at least one modality")
    unknown = sorted(set(modalities) - known)
    _require(not unknown, "data.modalities", f"unknown modalities {unknown}; allowed: {sorted(known)}")
    _require(len(set(modalities)) == len(modalities), "data.modalities", f"duplicates in {modalities}")

    input_size, patch_size = int(data.input_size), int(model.net.patch_size)
    _require(input_size > 0, "data.input_size", f"must be positive, got {input_size}")
    _require(
        patch_size > 0 and input_size % patch_size == 0,
        "model.net.patch_size",
        f"{patch_size} must divide data.input_size={input_size}",
    )
    stride = int(data.semseg_stride)
    _require(
        stride > 0 and patch_size % stride == 0 and input_size % stride == 0,
        "data.semseg_stride",
        f"{stride} must divide model.net.patch_size={patch_size} and data.input_size={input_size}",
    )
    num_tokens = count_input_tokens(modalities=modalities, input_size=input_size, patch_size=patch_size)
    net = int(model.num_encoded_tokens)
    _require(
        1 <= net <= num_tokens,
        "model.num_encoded_tokens",
        f"{net} is outside [1, {num_tokens}]: {len(modalities)} modalities x "
        f"({input_size}/{patch_size})^2 patches = {num_tokens} tokens",
    )
    _require(int(data.batch_size) > 0, "data.batch_size", f"must be positive, got {data.batch_size}")
    _require(int(data.num_workers) >= 0, "data.num_workers", f"must be >= 0, got {data.num_workers}")
    _require(float(model.blr) > 0, "model.blr", f"must be positive, got {model.blr}")
    _require(float(model.min_lr) >= 0, "model.min_lr", f"must be >= 0, got {model.min_lr}")
    _require(
        int(cfg.trainer.max_epochs) >= 1, "trainer.max_epochs", f"must be >= 1, got {cfg.trainer.max_epochs}"
    )
    lo, hi = (float(v) for v in data.crop_scale)
    _require(0 < lo <= hi <= 1, "data.crop_scale", f"needs 0 < min <= max <= 1, got {[lo, hi]}")

    if data.get("synthetic") is None:
        root = Path(str(data.root))
        _require(root.is_dir(), "data.root", f"{root} is not a directory")
        for split_key in ("train_dir", "val_dir"):
            split = root / str(data[split_key])
            _require(split.is_dir(), f"data.{split_key}", f"{split} does not exist")
            missing = [m for m in modalities if not (split / m).is_dir()]
            _require(not missing, "data.modalities", f"{split} has no folder for {missing}")

    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and ckpt != "last":
        _require(Path(str(ckpt)).is_file(), "ckpt_path", f"{ckpt} is not a file")


register_resolvers()
