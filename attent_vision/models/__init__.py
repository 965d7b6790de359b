"""MultiMAE model package: adapters, masking, encoder, decoders, losses, balancers and checkpoint I/O.

Nothing here imports Lightning; the LightningModules in ``attent_vision.lightning`` own training logic.
"""

from attent_vision.models.builders import MODEL_SIZES, build_pretrain_multimae
from attent_vision.models.checkpoint import (
    LoadReport,
    MissingEncoderWeightsError,
    load_pretrained,
    normalize_state_dict,
    resolve_checkpoint,
)
from attent_vision.models.checkpoint_keys import multimae_to_timm_vit, timm_vit_to_multimae
from attent_vision.models.heads import (
    ConvNeXtHead,
    DPTHead,
    LinearHead,
    dpt_feature_dim,
    dpt_hooks,
    dpt_layer_dims,
)
from attent_vision.models.input_adapters import PatchedInputAdapter, SemSegInputAdapter
from attent_vision.models.losses import (
    MaskedCrossEntropyLoss,
    MaskedL1Loss,
    MaskedMSELoss,
    SampleLoss,
    default_loss,
    reduce_batch,
    truncated_depth_standardize,
    upsample_token_mask,
)
from attent_vision.models.masking import (
    MaskingConfig,
    TokenMasks,
    expand_alphas,
    generate_random_masks,
    ids_from_task_masks,
    sample_task_shares,
)
from attent_vision.models.multimae import EncoderOutput, MultiMAE
from attent_vision.models.multivit import MultiViT, build_multivit
from attent_vision.models.output_adapters import CrossAttention, InputInfo, SpatialOutputAdapter, TaskTokens
from attent_vision.models.pos_embed import build_2d_sincos_pos_embed, pos_embed_to_tokens, resize_pos_embed
from attent_vision.models.released import RELEASED_WEIGHTS, WeightsDownloadError, fetch_weights
from attent_vision.models.task_balancing import NoTaskBalancer, UncertaintyTaskBalancer

__all__ = [
    "MODEL_SIZES",
    "RELEASED_WEIGHTS",
    "ConvNeXtHead",
    "CrossAttention",
    "DPTHead",
    "EncoderOutput",
    "InputInfo",
    "LinearHead",
    "LoadReport",
    "MaskedCrossEntropyLoss",
    "MaskedL1Loss",
    "MaskedMSELoss",
    "MaskingConfig",
    "MissingEncoderWeightsError",
    "MultiMAE",
    "MultiViT",
    "NoTaskBalancer",
    "PatchedInputAdapter",
    "SampleLoss",
    "SemSegInputAdapter",
    "SpatialOutputAdapter",
    "TaskTokens",
    "TokenMasks",
    "UncertaintyTaskBalancer",
    "WeightsDownloadError",
    "build_2d_sincos_pos_embed",
    "build_multivit",
    "build_pretrain_multimae",
    "default_loss",
    "dpt_feature_dim",
    "dpt_hooks",
    "dpt_layer_dims",
    "expand_alphas",
    "fetch_weights",
    "generate_random_masks",
    "ids_from_task_masks",
    "load_pretrained",
    "multimae_to_timm_vit",
    "normalize_state_dict",
    "pos_embed_to_tokens",
    "reduce_batch",
    "resize_pos_embed",
    "resolve_checkpoint",
    "sample_task_shares",
    "timm_vit_to_multimae",
    "truncated_depth_standardize",
    "upsample_token_mask",
]
