"""MultiMAE: multi-modal multi-task masked autoencoder (Bachmann et al. 2022); its builder is in ``builders``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import NamedTuple

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from attent_vision.data.modalities import (
    IMAGE_MODALITY,
    MODALITIES,
)
from attent_vision.models.blocks import transformer_blocks
from attent_vision.models.masking import MaskingConfig, TokenMasks, generate_random_masks, ids_from_task_masks
from attent_vision.models.output_adapters import (
    InputInfo,
    TaskTokens,
    default_norm_layer,
)

__all__ = ["EncoderOutput", "MultiMAE"]


class EncoderOutput(NamedTuple):
    """Result of :meth:`MultiMAE.forward_features`.

    Attributes:
        tokens: Encoder output [B, num_encoded + G, D]; global tokens last.
        input_info: Token layout of the full multi-task sequence.
        masks: Task masks (1 = masked), ids_keep and ids_restore.
    """

    tokens: Tensor
    input_info: InputInfo
    masks: TokenMasks


class MultiMAE(nn.Module):
    """Multi-modal masked autoencoder: input adapters → masked ViT encoder → per-task output adapters.

    Tokens of the input tasks are concatenated in the order of ``input_adapters`` (an ordered dict, never a set,
    whose order would vary between runs and scramble the token layout), a subset is kept by Dirichlet masking
    (``masking``), global tokens are appended after them without positional embedding, and a plain stack of
    pre-norm blocks (no final norm) encodes them. ``model(x, mask_seeds)`` masks, encodes and decodes with the
    model's own :class:`~attent_vision.models.masking.MaskingConfig`.

    Args:
        input_adapters: {task: adapter} with the ``init(dim_tokens)`` protocol.
        output_adapters: {task: adapter} with the ``init(dim_tokens_enc)`` protocol, or None.
        num_global_tokens: Number of learned global tokens G.
        dim_tokens: Encoder width D.
        depth: Number of encoder blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden ratio.
        qkv_bias: Bias on the qkv projection.
        drop_rate: Dropout after attention and MLP.
        attn_drop_rate: Attention-probability dropout.
        drop_path_rate: Stochastic depth of the last block (linear ramp from 0).
        norm_layer: Normalisation layer factory.
        masking: How the input tokens are masked (default ``MaskingConfig()``).
        fp32_output_adapters: Output tasks decoded with autocast disabled, on fp32 encoder tokens.
    """

    def __init__(
        self,
        *,
        input_adapters: Mapping[str, nn.Module],
        output_adapters: Mapping[str, nn.Module] | None = None,
        num_global_tokens: int = 1,
        dim_tokens: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: type[nn.Module] | partial = default_norm_layer,
        masking: MaskingConfig | None = None,
        fp32_output_adapters: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not input_adapters:
            raise ValueError("MultiMAE needs at least one input adapter")
        # 1. Adapters create their width-dependent parameters.
        for task, adapter in input_adapters.items():
            adapter.init(dim_tokens=dim_tokens)
            if getattr(adapter, "modality", "") is None:
                adapter.modality = task
        self.input_adapters = nn.ModuleDict(input_adapters)
        if output_adapters is not None:
            for adapter in output_adapters.values():
                adapter.init(dim_tokens_enc=dim_tokens)
            self.output_adapters = nn.ModuleDict(output_adapters)
        else:
            self.output_adapters = None

        # 2. Global tokens, trunc-normal.
        self.num_global_tokens = num_global_tokens
        self.global_tokens = nn.Parameter(torch.zeros(1, num_global_tokens, dim_tokens))
        trunc_normal_(self.global_tokens, std=0.02)

        self.encoder = transformer_blocks(
            dim=dim_tokens,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_layer=norm_layer,
        )
        self.dim_tokens = dim_tokens
        self.masking = masking if masking is not None else MaskingConfig()
        self.fp32_output_adapters = tuple(fp32_output_adapters)
        self.init_weights()

    # ------------------------------------------------------------------ initialisation
    @staticmethod
    def _init_linear_and_norm(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def init_weights(self) -> None:
        """The reference init, run after the adapters' own init: xavier Linears with zero bias (all of them, the
        output adapters' final projections included, although their constructors init them otherwise), LayerNorm
        1/0, Q·K·V-aware bounds for ``qkv``/``kv`` and xavier patch convolutions."""
        self.apply(self._init_linear_and_norm)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if "qkv" in name:  # Q, K and V as separate matrices
                    bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                elif "kv" in name:  # K and V as separate matrices
                    bound = math.sqrt(6.0 / float(m.weight.shape[0] // 2 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
            elif isinstance(m, nn.Conv2d) and ".proj" in name:  # patch projection initialised like a Linear
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))

    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters exempt from weight decay (all exist in ``named_parameters()``)."""
        names = {"global_tokens"}
        groups = [("input_adapters", self.input_adapters), ("output_adapters", self.output_adapters or {})]
        for prefix, adapters in groups:
            for task, adapter in adapters.items():
                if hasattr(adapter, "no_weight_decay"):
                    names |= {f"{prefix}.{task}.{n}" for n in adapter.no_weight_decay()}
        existing = dict(self.named_parameters())
        return {n for n in names if n in existing}

    def get_num_layers(self) -> int:
        """Number of encoder blocks."""
        return len(self.encoder)

    # ------------------------------------------------------------------ forward steps
    def infer_image_size(self, x: Mapping[str, Tensor]) -> tuple[int, int]:
        """Full image size from the image (rgb), else from a class-id map (semseg) × its stride, else from the
        first input × its stride."""
        if IMAGE_MODALITY in x:
            return tuple(x[IMAGE_MODALITY].shape[-2:])
        strided = [t for t in x if t in self.input_adapters and t in MODALITIES and MODALITIES[t].class_ids]
        task = strided[0] if strided else next(iter(x))
        stride = getattr(self.input_adapters[task], "stride_level", 1)
        h, w = x[task].shape[-2:]
        return h * stride, w * stride

    def tokenize(self, x: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], tuple[int, int]]:
        """Runs the input adapters of the tasks present in x, in adapter order.

        Returns:
            {task: tokens [B, N_t, D]} and the full image size (H, W).
        """
        present = {t: x[t] for t in self.input_adapters if t in x}
        if not present:
            raise ValueError(
                f"none of the input modalities {list(self.input_adapters)} is in the input (got {list(x)})"
            )
        image_size = self.infer_image_size(present)
        tokens = {}
        for task, tensor in present.items():
            adapter = self.input_adapters[task]
            stride = getattr(adapter, "stride_level", 1)
            expected = (image_size[0] // stride, image_size[1] // stride)
            if image_size[0] % stride or image_size[1] % stride or tuple(tensor.shape[-2:]) != expected:
                raise ValueError(
                    f"{task}: expected spatial size {expected[0]}x{expected[1]} (image {image_size[0]}x"
                    f"{image_size[1]}, stride {stride}), got {tensor.shape[-2]}x{tensor.shape[-1]}"
                )
            tokens[task] = adapter(tensor)  # [B, N_t, D]
        return tokens, image_size

    def build_input_info(self, tokens: Mapping[str, Tensor], image_size: tuple[int, int]) -> InputInfo:
        """Records where each task's tokens sit in the concatenated sequence."""
        tasks, start = {}, 0
        for task, t in tokens.items():
            tasks[task] = TaskTokens(num_tokens=t.shape[1], start_idx=start, end_idx=start + t.shape[1])
            start += t.shape[1]
        return InputInfo(
            tasks=tasks,
            image_size=(int(image_size[0]), int(image_size[1])),
            num_task_tokens=start,
            num_global_tokens=self.num_global_tokens,
        )

    def sample_masks(
        self,
        tokens: Mapping[str, Tensor],
        masking: MaskingConfig,
        *,
        mask_inputs: bool,
        task_masks: Mapping[str, Tensor] | None,
        mask_seeds: Tensor | None,
        generator: torch.Generator | None,
    ) -> TokenMasks:
        """User masks, Dirichlet masks drawn as ``masking`` says, or (mask_inputs=False) all tokens in order."""
        counts = {t: v.shape[1] for t, v in tokens.items()}
        first = next(iter(tokens.values()))
        batch, device = first.shape[0], first.device
        if task_masks is not None:
            return ids_from_task_masks({t: m.to(device) for t, m in task_masks.items()}, counts)
        if not mask_inputs:
            total = sum(counts.values())
            ids = torch.arange(total, device=device).expand(batch, total)
            zeros = {t: torch.zeros(batch, n, dtype=torch.long, device=device) for t, n in counts.items()}
            return TokenMasks(zeros, ids, ids)
        return generate_random_masks(
            counts,
            batch_size=batch,
            num_encoded_tokens=masking.num_encoded_tokens,
            alphas=masking.alphas,
            sample_tasks_uniformly=masking.sample_tasks_uniformly,
            tie_break_noise=masking.tie_break_noise,
            mask_seeds=mask_seeds,
            generator=generator,
            device=device,
        )

    def encode(self, tokens: Mapping[str, Tensor], ids_keep: Tensor) -> Tensor:
        """Gathers the visible tokens, appends the global tokens and runs the encoder → [B, n + G, D]."""
        x = torch.cat(list(tokens.values()), dim=1)  # [B, N_total, D]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, n, D]
        global_tokens = self.global_tokens.expand(x.shape[0], -1, -1)  # [B, G, D]
        return self.encoder(torch.cat([x, global_tokens], dim=1))

    def decode(self, features: EncoderOutput, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Runs the output adapters of ``tasks`` (default: all, in adapter order) on the encoder output; those in
        ``fp32_output_adapters`` with autocast off on fp32 tokens."""
        tokens, info, masks = features.tokens, features.input_info, features.masks
        adapters = self.output_adapters or {}
        preds = {}
        for task in adapters if tasks is None else tasks:
            adapter = adapters[task]
            if task in self.fp32_output_adapters:
                with torch.autocast(device_type=tokens.device.type, enabled=False):
                    preds[task] = adapter(tokens.float(), info, masks.ids_keep, masks.ids_restore)
            else:
                preds[task] = adapter(tokens, info, masks.ids_keep, masks.ids_restore)
        return preds

    def forward_features(
        self,
        x: Mapping[str, Tensor] | Tensor,
        mask_seeds: Tensor | None = None,
        *,
        masking: MaskingConfig | None = None,
        mask_inputs: bool = True,
        task_masks: Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> EncoderOutput:
        """Tokenise, mask and encode (see :meth:`forward` for the arguments)."""
        masking = masking if masking is not None else self.masking
        x = {IMAGE_MODALITY: x} if isinstance(x, Tensor) else x
        tokens, image_size = self.tokenize(x)
        input_info = self.build_input_info(tokens, image_size)
        budget = masking.num_encoded_tokens
        if mask_inputs and task_masks is None and not 1 <= budget <= input_info.num_task_tokens:
            raise ValueError(
                f"num_encoded_tokens must be in [1, {input_info.num_task_tokens}] (the total number of input "
                f"tokens), got {budget}"
            )
        masks = self.sample_masks(
            tokens,
            masking,
            mask_inputs=mask_inputs,
            task_masks=task_masks,
            mask_seeds=mask_seeds,
            generator=generator,
        )
        return EncoderOutput(self.encode(tokens, masks.ids_keep), input_info, masks)

    def forward(
        self,
        x: Mapping[str, Tensor] | Tensor,
        mask_seeds: Tensor | None = None,
        *,
        masking: MaskingConfig | None = None,
        mask_inputs: bool = True,
        task_masks: Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Masked multi-task reconstruction, masking as ``self.masking`` says.

        Args:
            x: {task: tensor}; rgb/depth (B, C, H, W), semseg (B, H/stride, W/stride) int64. Tasks without an
                input adapter are ignored; any non-empty subset of the input tasks works. A bare tensor is rgb.
            mask_seeds: Optional int64 (B,) per-sample mask seeds: sample b's mask is then a function of
                ``mask_seeds[b]`` alone (reproducible validation and scoring).
            masking: Overrides ``self.masking`` for this call.
            mask_inputs: Mask tokens (False encodes every token).
            task_masks: Optional {task: (B, N_t)} masks (1 = masked) with the same visible count per sample.
            generator: Optional generator for the masks (when there are no ``mask_seeds``).

        Returns:
            ({task: prediction (B, C, H/stride, W/stride)}, {task: mask (B, N_t), 1 = masked}).
        """
        features = self.forward_features(
            x,
            mask_seeds,
            masking=masking,
            mask_inputs=mask_inputs,
            task_masks=task_masks,
            generator=generator,
        )
        return self.decode(features), features.masks.task_masks
