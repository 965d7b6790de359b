"""MultiMAE's spatial cross-attention decoder and the token-layout record it reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from timm.layers import Mlp, to_2tuple, trunc_normal_
from torch import Tensor, nn

from attent_vision.models.blocks import transformer_blocks
from attent_vision.models.pos_embed import build_2d_sincos_pos_embed, pos_embed_to_tokens

__all__ = ["CrossAttention", "InputInfo", "SpatialOutputAdapter", "TaskTokens", "default_norm_layer"]

#: LayerNorm with eps 1e-6, the norm of every MultiMAE block.
default_norm_layer = partial(nn.LayerNorm, eps=1e-6)


@dataclass(frozen=True)
class TaskTokens:
    """Where one task's tokens sit in the full (unmasked) multi-task sequence."""

    num_tokens: int
    start_idx: int
    end_idx: int
    has_2d_posemb: bool = True


@dataclass(frozen=True)
class InputInfo:
    """Layout of the encoder input: per-task slices, image size and token counts."""

    tasks: dict[str, TaskTokens]
    image_size: tuple[int, int]
    num_task_tokens: int
    num_global_tokens: int


class CrossAttention(nn.Module):
    """Multi-head cross-attention with separate ``q`` and fused ``kv`` projections.

    ``fused_attn`` picks PyTorch's fused SDPA kernel or the explicit softmax(q kᵀ/√d) v, as timm's Attention does
    (``attent_vision.models.attention`` sets it per device and precision).

    Args:
        dim: Token width.
        num_heads: Number of heads.
        qkv_bias: Bias on the q/kv projections.
        attn_drop: Attention-probability dropout.
        proj_drop: Output dropout.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = True

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """Attends queries x [B, N, D] to context [B, M, D]; returns [B, N, D]."""
        q = rearrange(self.q(x), "b n (h e) -> b h n e", h=self.num_heads)  # [B, H, N, E]
        k, v = rearrange(self.kv(context), "b m (two h e) -> two b h m e", two=2, h=self.num_heads)
        dropout = self.attn_drop if self.training else 0.0
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, N, M]
            x = F.dropout(attn.softmax(dim=-1), dropout, self.training) @ v
        x = rearrange(x, "b h n e -> b n (h e)")  # [B, N, D]
        return self.proj_drop(self.proj(x))


class SpatialOutputAdapter(nn.Module):
    """Cross-attention decoder that reconstructs one dense task from the encoder tokens (MultiMAE's).

    Queries are the full token grid of ``task`` (encoded visible tokens plus mask tokens, with positional and
    task embeddings); the context is the visible tokens of every input task plus the global tokens.

    Args:
        num_channels: Output channels.
        stride_level: Output resolution relative to the full image.
        patch_size_full: Patch size measured on the full image.
        dim_tokens_enc: Encoder width; when given, ``init`` runs immediately.
        dim_tokens: Decoder width.
        depth: Number of self-attention blocks after the cross-attention.
        learnable_pos_emb: Learn the positional embedding (layout (1, D, h, w); the reference creates the
            learnable one as (1, h, w, D), which its own forward then misreads).
        image_size: Default full image size, sets the stored positional-embedding grid.
        mlp_ratio: MLP hidden ratio.
        num_heads: Attention heads.
        qkv_bias: Bias on the attention input projections.
        drop_rate: Output dropout of attention and MLP.
        attn_drop_rate: Attention-probability dropout.
        drop_path_rate: Stochastic depth of the decoder blocks (linear ramp).
        norm_layer: Normalisation layer factory.
        use_task_queries: Use this task's encoded tokens as queries when the task is an input.
        task: Task whose tokens form the queries (e.g. 'rgb' for both rgb and norm_rgb).
        context_tasks: Input tasks that get a learned task embedding; None gives an empty ParameterDict.
        use_xattn: Run the cross-attention + MLP stage.
    """

    def __init__(
        self,
        *,
        num_channels: int,
        stride_level: int = 1,
        patch_size_full: int | tuple[int, int] = 16,
        dim_tokens_enc: int | None = None,
        dim_tokens: int = 256,
        depth: int = 0,
        learnable_pos_emb: bool = False,
        image_size: int | tuple[int, int] = 224,
        mlp_ratio: float = 4.0,
        num_heads: int = 8,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: type[nn.Module] | partial = default_norm_layer,
        use_task_queries: bool = True,
        task: str | None = None,
        context_tasks: Sequence[str] | None = None,
        use_xattn: bool = True,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.stride_level = stride_level
        self.patch_size_full = to_2tuple(patch_size_full)
        self.dim_tokens_enc = dim_tokens_enc
        self.dim_tokens = dim_tokens
        self.learnable_pos_emb = learnable_pos_emb
        self.image_size = to_2tuple(image_size)
        self.use_task_queries = use_task_queries
        self.task = task
        self.use_xattn = use_xattn
        self.P_H = max(1, self.patch_size_full[0] // stride_level)
        self.P_W = max(1, self.patch_size_full[1] // stride_level)

        # Empty (no state-dict keys) when context_tasks is None, so lookups never fail (the reference then has no
        # task_embeddings attribute at all and fails in forward).
        self.task_embeddings = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(1, 1, dim_tokens)) for t in (context_tasks or ())}
        )
        for embedding in self.task_embeddings.values():
            trunc_normal_(embedding, std=0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim_tokens))  # zeros, no further init (reference)

        h = self.image_size[0] // (stride_level * self.P_H)
        w = self.image_size[1] // (stride_level * self.P_W)
        if learnable_pos_emb:
            self.pos_emb = nn.Parameter(torch.zeros(1, dim_tokens, h, w))
            trunc_normal_(self.pos_emb, std=0.02)
        else:
            self.pos_emb = nn.Parameter(build_2d_sincos_pos_embed(h, w, dim_tokens), requires_grad=False)

        if use_xattn:
            self.decoder = CrossAttention(
                dim=dim_tokens,
                num_heads=num_heads,
                qkv_bias=qkv_bias,
                attn_drop=attn_drop_rate,
                proj_drop=drop_rate,
            )
            self.context_norm = norm_layer(dim_tokens)
            self.query_norm = norm_layer(dim_tokens)
            self.out_norm = norm_layer(dim_tokens)
            self.mlp = Mlp(in_features=dim_tokens, hidden_features=int(dim_tokens * mlp_ratio))

        if depth > 0:
            self.decoder_transformer = transformer_blocks(
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
        else:
            self.decoder_transformer = nn.Identity()

        self.out_proj = nn.Linear(dim_tokens, num_channels * self.P_H * self.P_W)
        if dim_tokens_enc is not None:
            self.init(dim_tokens_enc)

    def init(self, dim_tokens_enc: int = 768) -> None:
        """Creates ``proj_context`` mapping encoder tokens (width ``dim_tokens_enc``) to decoder width."""
        self.dim_tokens_enc = dim_tokens_enc
        self.proj_context = nn.Linear(dim_tokens_enc, self.dim_tokens)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this adapter) exempt from weight decay (names that exist; the
        reference lists some names that match no parameter)."""
        return {"pos_emb", "mask_token", *(f"task_embeddings.{t}" for t in self.task_embeddings)}

    def output_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid (N_H, N_W) of this task for a full image of ``image_size``."""
        return image_size[0] // (self.stride_level * self.P_H), image_size[1] // (
            self.stride_level * self.P_W
        )

    def task_embedding(self, task: str) -> Tensor | None:
        """The (1, 1, D) embedding of ``task``, or None when it has none."""
        return self.task_embeddings.get(task)

    def context_embeddings(self, input_info: InputInfo, grid: tuple[int, int]) -> Tensor:
        """Task plus positional embeddings for every position of the full sequence, shape (1, N_total, D)."""
        pos = pos_embed_to_tokens(self.pos_emb, grid, mode="bilinear")  # [1, N_grid, D]
        embeddings = []
        for task, info in input_info.tasks.items():
            task_emb = self.task_embedding(task)
            emb = pos.new_zeros(1, info.num_tokens, self.dim_tokens) if task_emb is None else task_emb
            if info.has_2d_posemb:
                if info.num_tokens != pos.shape[1]:
                    raise ValueError(
                        f"{task}: {info.num_tokens} tokens do not match the {grid[0]}x{grid[1]} grid of "
                        f"output adapter '{self.task}'"
                    )
                emb = emb + pos
            embeddings.append(emb.expand(1, info.num_tokens, -1))
        return torch.cat(embeddings, dim=1)  # [1, N_total, D]

    def queries_and_context(
        self, context_tokens: Tensor, input_info: InputInfo, ids_keep: Tensor, ids_restore: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Builds decoder queries and context from projected encoder tokens: mask tokens appended and unshuffled
        to the full layout, task and positional embeddings added, then this task's grid taken as queries.

        Args:
            context_tokens: Projected encoder output [B, n_visible + G, D].
            input_info: Token layout of the encoder input.
            ids_keep: Indices of the visible tokens in the full sequence [B, n_visible].
            ids_restore: Permutation that unshuffles [visible, masked] to the full sequence [B, N_total].

        Returns:
            queries [B, N_H·N_W, D] and context [B, n_visible + G, D].
        """
        batch, num_context, dim = context_tokens.shape
        num_global = input_info.num_global_tokens
        num_visible = num_context - num_global
        grid = self.output_grid(input_info.image_size)
        visible, global_tokens = context_tokens[:, :num_visible], context_tokens[:, num_visible:]

        # Append mask tokens and unshuffle to the full multi-task layout, then embed every position.
        mask_tokens = self.mask_token.expand(batch, input_info.num_task_tokens - num_visible, dim)
        full = torch.cat([visible, mask_tokens], dim=1)  # [B, N_total, D]
        full = torch.gather(full, 1, repeat(ids_restore, "b n -> b n d", d=dim))
        full = full + self.context_embeddings(input_info, grid)  # [B, N_total, D]

        # Queries: this task's slice, or mask token + pos + task embedding when the task is not an input.
        if self.use_task_queries and self.task in input_info.tasks:
            info = input_info.tasks[self.task]
            queries = full[:, info.start_idx : info.end_idx]  # [B, N_t, D]
        else:
            queries = self.mask_token + pos_embed_to_tokens(self.pos_emb, grid, mode="bilinear")  # [1, N, D]
            task_emb = self.task_embedding(self.task) if self.task is not None else None
            if task_emb is not None:
                queries = queries + task_emb
            queries = queries.expand(batch, -1, -1)

        # Context: back to the visible tokens (now embedded), then the global tokens without embeddings.
        context = torch.gather(full, 1, repeat(ids_keep, "b n -> b n d", d=dim))  # [B, n_visible, D]
        return queries, torch.cat([context, global_tokens], dim=1)

    def unpatchify(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, N_H·N_W, C·P_H·P_W) patch predictions to a (B, C, N_H·P_H, N_W·P_W) map."""
        return rearrange(
            x,
            "b (nh nw) (c ph pw) -> b c (nh ph) (nw pw)",
            nh=grid[0],
            nw=grid[1],
            ph=self.P_H,
            pw=self.P_W,
            c=self.num_channels,
        )

    def forward(
        self, encoder_tokens: Tensor, input_info: InputInfo, ids_keep: Tensor, ids_restore: Tensor
    ) -> Tensor:
        """Decodes encoder tokens [B, n_visible + G, D_enc] into a (B, C, H/stride, W/stride) prediction."""
        if self.dim_tokens_enc is None:
            raise RuntimeError("SpatialOutputAdapter: call init(dim_tokens_enc) before forward")
        grid = self.output_grid(input_info.image_size)
        context_tokens = self.proj_context(encoder_tokens)  # [B, n_visible + G, D]
        queries, context = self.queries_and_context(context_tokens, input_info, ids_keep, ids_restore)
        if self.use_xattn:
            # No residual from the queries around the cross-attention (reference behaviour).
            x = self.decoder(self.query_norm(queries), self.context_norm(context))  # [B, N, D]
            x = x + self.mlp(self.out_norm(x))
        else:
            x = queries
        x = self.decoder_transformer(x)
        x = self.out_proj(x)  # [B, N, C·P_H·P_W]
        return self.unpatchify(x, grid)
