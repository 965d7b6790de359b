"""MultiViT: the MultiMAE encoder without masking plus downstream heads, for fine-tuning (reference "multivit")."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attent_vision.data.modalities import IMAGE_MODALITY, check_modalities
from attent_vision.models.builders import check_geometry, encoder_size, input_adapter
from attent_vision.models.multimae import EncoderOutput, MultiMAE
from attent_vision.models.output_adapters import InputInfo, default_norm_layer

__all__ = ["MultiViT", "build_multivit"]


class MultiViT(MultiMAE):
    """MultiMAE encoder that encodes every input token, followed by per-task heads.

    State-dict keys equal MultiMAE's (``input_adapters.*``, ``global_tokens``, ``encoder.<i>.*``,
    ``output_adapters.<task>.*``), so pretraining checkpoints load directly. The heads are attached after
    MultiMAE's xavier re-init and are left out of :meth:`init_weights`, so they keep their own init (the reference
    re-inits them with xavier too, which undoes e.g. the small ``init_scale`` of the linear head).
    A head is called as ``head(final_tokens, input_info)``, or with the list of every encoder layer's output
    when its ``needs_all_layers`` attribute is true (DPT).

    Args:
        input_adapters: {task: adapter} with the ``init(dim_tokens)`` protocol.
        output_adapters: {task: head}, fully built heads; None for an encoder only.
        **kwargs: Encoder settings of :class:`MultiMAE` (dim_tokens, depth, num_heads, drop_path_rate, ...).
    """

    def __init__(
        self,
        *,
        input_adapters: Mapping[str, nn.Module],
        output_adapters: Mapping[str, nn.Module] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(input_adapters=input_adapters, output_adapters=None, **kwargs)
        self.output_adapters = nn.ModuleDict(dict(output_adapters or {}))

    def init_weights(self) -> None:
        """MultiMAE's reference init of the encoder and input adapters; heads are left untouched."""
        heads = self._modules.pop("output_adapters", None)  # hidden from MultiMAE's self.apply
        try:
            super().init_weights()
        finally:
            if heads is not None:
                self._modules["output_adapters"] = heads

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm layer grouping for layer-wise lr decay, as timm's VisionTransformer does it.

        Input adapters and global tokens are layer 0, ``encoder.<i>`` is layer i + 1 and the heads come last
        (L + 1), so with decay ld a head gets lr scale 1, block i gets ld^(L − i) and the stem ld^(L + 1).
        The heads are left unmatched on purpose: timm puts unmatched names in a last group of their own (as
        it does for ViT's ``head``), whereas the ordinal (99999,) means "merge into the previous group".
        """
        del coarse  # one group per block either way
        return {
            "stem": r"^(?:input_adapters|global_tokens)",
            "blocks": r"^encoder\.(\d+)",
        }

    def forward_features(
        self,
        x: Mapping[str, Tensor] | Tensor,
        mask_seeds: Tensor | None = None,
        *,
        mask_inputs: bool = False,
        **kwargs: Any,
    ) -> EncoderOutput:
        """MultiMAE's :meth:`~MultiMAE.forward_features`, but encoding every token unless asked to mask."""
        return super().forward_features(x, mask_seeds, mask_inputs=mask_inputs, **kwargs)

    def forward_encoder(
        self, x: Mapping[str, Tensor] | Tensor, *, return_all_layers: bool = False
    ) -> tuple[Tensor | list[Tensor], InputInfo]:
        """Encodes every token of the given inputs (no masking).

        Args:
            x: {task: tensor} as for :meth:`MultiMAE.forward`; a bare tensor is rgb.
            return_all_layers: Return every block's output instead of the last one.

        Returns:
            (final tokens [B, N + G, D] or L × [B, N + G, D], input_info); global tokens last.
        """
        x = {IMAGE_MODALITY: x} if isinstance(x, Tensor) else x
        tokens, image_size = self.tokenize(x)
        input_info = self.build_input_info(tokens, image_size)
        h = torch.cat(list(tokens.values()), dim=1)  # [B, N, D]
        h = torch.cat([h, self.global_tokens.expand(h.shape[0], -1, -1)], dim=1)  # [B, N + G, D]
        if not return_all_layers:
            return self.encoder(h), input_info
        layers = []
        for block in self.encoder:
            h = block(h)
            layers.append(h)
        return layers, input_info

    def forward(self, x: Mapping[str, Tensor] | Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Runs the encoder once and every head on it.

        Returns:
            {task: prediction}, e.g. logits [B, K] or dense maps [B, C, H, W].
        """
        all_layers = any(getattr(head, "needs_all_layers", False) for head in self.output_adapters.values())
        features, input_info = self.forward_encoder(x, return_all_layers=all_layers)
        final = features[-1] if all_layers else features
        return {
            task: head(features if getattr(head, "needs_all_layers", False) else final, input_info)
            for task, head in self.output_adapters.items()
        }


def _call_head_factory(task: str, factory: Callable[..., nn.Module], derived: Mapping[str, Any]) -> nn.Module:
    """Calls ``factory`` with the derived encoder settings it accepts; settings it already binds must agree."""
    if isinstance(factory, nn.Module):
        return factory
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    bound = getattr(factory, "keywords", {}) or {}
    kwargs = {}
    for name, value in derived.items():
        if name in bound:
            if bound[name] != value:
                raise ValueError(
                    f"head {task!r}: {name}={bound[name]!r} is set but the encoder has {name}={value!r}; "
                    f"remove it from the head config (it is derived from the encoder)"
                )
            continue
        if takes_any or name in params:
            kwargs[name] = value
    return factory(**kwargs)


def build_multivit(
    *,
    size: str = "base",
    in_domains: Sequence[str] = ("rgb",),
    image_size: int = 224,
    patch_size: int = 16,
    semseg_num_classes: int = 133,
    semseg_stride: int = 4,
    drop_path_rate: float = 0.0,
    num_global_tokens: int = 1,
    heads: Mapping[str, Callable[..., nn.Module]] | None = None,
) -> MultiViT:
    """Builds the fine-tuning MultiViT (reference ``multivit_base/large`` plus the micro/tiny/small sizes).

    Input adapters are those of :func:`~attent_vision.models.build_pretrain_multimae`; a semseg input gets a
    class-embedding padding row at index ``semseg_num_classes`` (reference fine-tuning; 133 → 134 rows).

    Args:
        size: Encoder size, a key of ``MODEL_SIZES``.
        in_domains: Input modalities, in token order.
        image_size: Default full image size (sets the stored positional-embedding grids).
        patch_size: Patch size on the full image.
        semseg_num_classes: Classes of the semseg input (133 for the COCO pseudo labels of pretraining).
        semseg_stride: Resolution divisor of semseg inputs.
        drop_path_rate: Encoder stochastic depth.
        num_global_tokens: Number of global tokens.
        heads: {task: head factory}, e.g. ``functools.partial`` objects from Hydra ``_partial_: true``.
            Each is called with whichever of ``dim_tokens_enc``, ``patch_size`` and ``encoder_depth`` it accepts.

    Returns:
        The initialised MultiViT.
    """
    encoder = encoder_size(size)
    in_domains = check_modalities("in_domains", in_domains)
    check_geometry(image_size=image_size, patch_size=patch_size, semseg_stride=semseg_stride)
    derived = {
        "dim_tokens_enc": encoder["dim_tokens"],
        "patch_size": patch_size,
        "encoder_depth": encoder["depth"],
    }
    built = {task: _call_head_factory(task, factory, derived) for task, factory in (heads or {}).items()}
    for task, head in built.items():
        absent = [t for t in getattr(head, "main_tasks", ()) if t not in in_domains]
        if absent:
            raise ValueError(
                f"head {task!r} decodes main task(s) {absent}, which are not in in_domains {in_domains}"
            )
    input_adapters = {
        d: input_adapter(
            d,
            patch_size=patch_size,
            image_size=image_size,
            learnable_pos_emb=False,
            semseg_num_classes=semseg_num_classes,
            semseg_stride=semseg_stride,
            semseg_padding_idx=semseg_num_classes,
        )
        for d in in_domains
    }
    return MultiViT(
        input_adapters=input_adapters,
        output_adapters=built,
        num_global_tokens=num_global_tokens,
        drop_path_rate=drop_path_rate,
        mlp_ratio=4.0,
        qkv_bias=True,
        norm_layer=default_norm_layer,
        **encoder,
    )
