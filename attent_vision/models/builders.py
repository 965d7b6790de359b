"""Building MultiMAE from a size name and the data's geometry: the encoder sizes, the input adapters every
modality gets, and the Hydra builder of the pretraining network (fine-tuning's MultiViT reuses the helpers)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from attent_vision.data.modalities import (
    DEFAULT_MODALITIES,
    IMAGE_MODALITY,
    MODALITIES,
    NORM_PIX_TASK,
    check_modalities,
)
from attent_vision.models.input_adapters import PatchedInputAdapter, SemSegInputAdapter
from attent_vision.models.masking import MaskingConfig
from attent_vision.models.multimae import MultiMAE
from attent_vision.models.output_adapters import (
    SpatialOutputAdapter,
    default_norm_layer,
)

__all__ = ["MODEL_SIZES", "build_pretrain_multimae", "check_geometry", "encoder_size", "input_adapter"]

MODEL_SIZES: dict[str, dict[str, int]] = {
    "micro": {"dim_tokens": 128, "depth": 4, "num_heads": 4},
    "tiny": {"dim_tokens": 192, "depth": 12, "num_heads": 3},
    "small": {"dim_tokens": 384, "depth": 12, "num_heads": 6},
    "base": {"dim_tokens": 768, "depth": 12, "num_heads": 12},
    "large": {"dim_tokens": 1024, "depth": 24, "num_heads": 16},
}


def encoder_size(size: str) -> dict[str, int]:
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; allowed: {list(MODEL_SIZES)}")
    return MODEL_SIZES[size]


def check_geometry(*, image_size: int, patch_size: int, semseg_stride: int) -> None:
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    if patch_size % semseg_stride:
        raise ValueError(f"patch_size {patch_size} is not divisible by semseg_stride {semseg_stride}")


def input_adapter(
    domain: str,
    *,
    patch_size: int,
    image_size: int,
    learnable_pos_emb: bool,
    semseg_num_classes: int,
    semseg_stride: int,
    semseg_padding_idx: int | None = None,
) -> nn.Module:
    """The input adapter of a registered modality (shared by the pretraining and fine-tuning builders).

    A class-id map (semseg) is read at ``semseg_stride`` through a 64-d class embedding; any other modality is
    patched at full resolution by a convolution over its channels.
    """
    modality = MODALITIES[domain]
    common = dict(patch_size_full=patch_size, image_size=image_size, learnable_pos_emb=learnable_pos_emb)
    if modality.class_ids:
        return SemSegInputAdapter(
            num_classes=semseg_num_classes,
            stride_level=semseg_stride,
            dim_class_emb=64,
            emb_padding_idx=semseg_padding_idx,
            modality=domain,
            **common,
        )
    return PatchedInputAdapter(num_channels=modality.channels, stride_level=1, modality=domain, **common)


def output_layout(domain: str, *, semseg_num_classes: int, semseg_stride: int) -> tuple[int, int]:
    """(output channels, stride) of a registered modality: class-id maps give one logit per class at stride."""
    modality = MODALITIES[domain]
    if modality.class_ids:
        return semseg_num_classes, semseg_stride
    return modality.channels, 1


def build_pretrain_multimae(
    *,
    size: str = "base",
    in_domains: Sequence[str] = DEFAULT_MODALITIES,
    out_domains: Sequence[str] = DEFAULT_MODALITIES,
    image_size: int = 224,
    patch_size: int = 16,
    semseg_num_classes: int = 133,
    semseg_stride: int = 4,
    decoder_dim: int = 256,
    decoder_depth: int = 2,
    decoder_num_heads: int = 8,
    extra_norm_pix_loss: bool = True,
    num_global_tokens: int = 1,
    drop_path_rate: float = 0.0,
    learnable_pos_emb: bool = False,
    masking: MaskingConfig | Mapping[str, Any] | None = None,
    fp32_output_adapters: Sequence[str] | None = None,
) -> MultiMAE:
    """Builds the MultiMAE pretraining model (reference ``pretrain_multimae_base/large``).

    Every modality's adapters follow its entry in ``attent_vision.data.modalities.MODALITIES``: channels, and
    whether it is a class-id map (read and predicted at ``semseg_stride``, ``semseg_num_classes`` logits).

    Sizes: micro (128/4/4), tiny (192/12/3), small (384/12/6), base (768/12/12), large (1024/24/16); all with
    mlp_ratio 4, qkv_bias and LayerNorm eps 1e-6. Only base and large have released MultiMAE weights; micro,
    tiny and small are additions of this project with no released weights.

    Args:
        size: Encoder size name, a key of ``MODEL_SIZES``.
        in_domains: Input modalities (registered names, e.g. rgb, depth, semseg); their order is the token order.
        out_domains: Reconstructed modalities.
        image_size: Default full image size (sets the stored positional-embedding grids).
        patch_size: Patch size on the full image.
        semseg_num_classes: Semantic classes (133 for COCO panoptic pseudo labels).
        semseg_stride: Resolution divisor of the semseg maps.
        decoder_dim: Width of the output adapters.
        decoder_depth: Self-attention blocks per output adapter.
        decoder_num_heads: Heads of the output adapters.
        extra_norm_pix_loss: Add a ``norm_rgb`` output adapter (rgb queries) for the norm-pix MSE loss.
        num_global_tokens: Number of global tokens.
        drop_path_rate: Encoder stochastic depth.
        learnable_pos_emb: Train the input adapters' positional embeddings.
        masking: The model's token masking (a ``MaskingConfig`` or its fields; default ``MaskingConfig()``).
        fp32_output_adapters: Output tasks decoded in fp32 under mixed precision; None: the class-id outputs
            (semseg), whose many-class logits lose too much in bf16.

    Returns:
        The initialised MultiMAE.
    """
    encoder = encoder_size(size)
    in_domains = check_modalities("in_domains", in_domains)
    out_domains = check_modalities("out_domains", out_domains)
    check_geometry(image_size=image_size, patch_size=patch_size, semseg_stride=semseg_stride)

    if masking is not None and not isinstance(masking, MaskingConfig):
        masking = MaskingConfig(**masking)
    if fp32_output_adapters is None:
        fp32_output_adapters = [d for d in out_domains if MODALITIES[d].class_ids]

    def output_adapter(domain: str, task: str) -> SpatialOutputAdapter:
        channels, stride = output_layout(
            domain, semseg_num_classes=semseg_num_classes, semseg_stride=semseg_stride
        )
        return SpatialOutputAdapter(
            num_channels=channels,
            stride_level=stride,
            patch_size_full=patch_size,
            dim_tokens=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
            image_size=image_size,
            use_task_queries=True,
            task=task,
            context_tasks=in_domains,
            use_xattn=True,
        )

    outputs = {d: output_adapter(d, d) for d in out_domains}
    if extra_norm_pix_loss:
        outputs[NORM_PIX_TASK] = output_adapter(IMAGE_MODALITY, IMAGE_MODALITY)
    return MultiMAE(
        input_adapters={
            d: input_adapter(
                d,
                patch_size=patch_size,
                image_size=image_size,
                learnable_pos_emb=learnable_pos_emb,
                semseg_num_classes=semseg_num_classes,
                semseg_stride=semseg_stride,
            )
            for d in in_domains
        },
        output_adapters=outputs,
        num_global_tokens=num_global_tokens,
        drop_path_rate=drop_path_rate,
        mlp_ratio=4.0,
        qkv_bias=True,
        norm_layer=default_norm_layer,
        masking=masking,
        fp32_output_adapters=fp32_output_adapters,
        **encoder,
    )
