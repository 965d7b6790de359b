"""MultiMAE model: positional embeddings, adapters, forward shapes, masking integration and weight init."""

import math

import pytest
import timm.optim
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from attent_vision.models import (
    MODEL_SIZES,
    InputInfo,
    MaskingConfig,
    MultiMAE,
    PatchedInputAdapter,
    SemSegInputAdapter,
    SpatialOutputAdapter,
    TaskTokens,
    build_2d_sincos_pos_embed,
    build_pretrain_multimae,
    generate_random_masks,
    resize_pos_embed,
)

NUM_CLASSES = 133


@pytest.fixture(scope="module")
def micro() -> MultiMAE:
    torch.manual_seed(0)
    return build_pretrain_multimae(
        size="micro",
        image_size=32,
        patch_size=8,
        semseg_stride=4,
        masking=MaskingConfig(num_encoded_tokens=12),
    ).eval()


def _visible(num_encoded_tokens: int) -> MaskingConfig:
    """A per-call masking override with another token budget."""
    return MaskingConfig(num_encoded_tokens=num_encoded_tokens)


def _inputs(batch: int, size: int, semseg_stride: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "rgb": torch.randn(batch, 3, size, size, generator=g),
        "depth": torch.randn(batch, 1, size, size, generator=g),
        "semseg": torch.randint(
            0, NUM_CLASSES, (batch, size // semseg_stride, size // semseg_stride), generator=g
        ),
    }


# ---------------------------------------------------------------- positional embeddings


def test_sincos_layout_rows_then_columns_on_square_grid():
    h = w = 5
    dim = 16
    emb = build_2d_sincos_pos_embed(h, w, dim)
    assert emb.shape == (1, dim, h, w)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    for r in range(h):
        for c in range(w):
            expected = torch.cat(
                [torch.sin(r * omega), torch.cos(r * omega), torch.sin(c * omega), torch.cos(c * omega)]
            )
            assert torch.allclose(emb[0, :, r, c], expected, atol=1e-6)


def test_sincos_non_square_reproduces_reference_reshape():
    h, w, dim = 2, 3, 8
    emb = build_2d_sincos_pos_embed(h, w, dim)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    for r in range(h):
        for c in range(w):
            m = r * w + c  # the (w h) flattening read back as (h w)
            a, b = m // h, m % h
            expected = torch.cat(
                [torch.sin(a * omega), torch.cos(a * omega), torch.sin(b * omega), torch.cos(b * omega)]
            )
            assert torch.allclose(emb[0, :, r, c], expected, atol=1e-6)


def test_resize_pos_embed_matches_plain_interpolate():
    emb = build_2d_sincos_pos_embed(4, 4, 16)
    assert resize_pos_embed(emb, (4, 4)) is emb
    for mode in ("bicubic", "bilinear"):
        out = resize_pos_embed(emb, (6, 3), mode=mode)
        assert torch.allclose(out, F.interpolate(emb, size=(6, 3), mode=mode, align_corners=False), atol=1e-6)


# ---------------------------------------------------------------- builder and structure


def test_builder_structure_and_sizes(micro):
    assert list(micro.input_adapters) == ["rgb", "depth", "semseg"]
    assert list(micro.output_adapters) == ["rgb", "depth", "semseg", "norm_rgb"]
    assert micro.output_adapters["norm_rgb"].task == "rgb"
    assert micro.global_tokens.shape == (1, 1, 128) and len(micro.encoder) == 4
    assert isinstance(micro.input_adapters["semseg"].class_emb, nn.Embedding)
    assert micro.input_adapters["semseg"].proj.kernel_size == (2, 2)
    assert isinstance(micro.encoder[-1], Block) and not hasattr(micro, "norm")  # no final LayerNorm
    assert set(MODEL_SIZES) == {"micro", "tiny", "small", "base", "large"}
    assert MODEL_SIZES["large"] == {"dim_tokens": 1024, "depth": 24, "num_heads": 16}


def test_builder_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"allowed: \['micro', 'tiny', 'small', 'base', 'large'\]"):
        build_pretrain_multimae(size="huge")
    with pytest.raises(ValueError, match=r"normals.*allowed: \['rgb', 'depth', 'semseg'\]"):
        build_pretrain_multimae(size="micro", in_domains=("rgb", "normals"), image_size=32, patch_size=8)


def test_drop_path_increases_linearly():
    model = build_pretrain_multimae(
        size="micro",
        image_size=16,
        patch_size=8,
        drop_path_rate=0.3,
        in_domains=("rgb",),
        out_domains=("rgb",),
    )
    assert isinstance(model.encoder[0].drop_path1, nn.Identity)
    assert model.encoder[-1].drop_path1.drop_prob == pytest.approx(0.3)
    assert model.encoder[1].drop_path1.drop_prob == pytest.approx(0.1)


# ---------------------------------------------------------------- forward


def test_forward_shapes_micro_32(micro):
    preds, masks = micro(_inputs(2, 32))  # the model's own masking: 12 visible tokens
    assert preds["rgb"].shape == (2, 3, 32, 32) and preds["norm_rgb"].shape == (2, 3, 32, 32)
    assert preds["depth"].shape == (2, 1, 32, 32)
    assert preds["semseg"].shape == (2, NUM_CLASSES, 8, 8)
    assert {t: m.shape for t, m in masks.items()} == {t: (2, 16) for t in ("rgb", "depth", "semseg")}
    assert sum((1 - m).sum(1) for m in masks.values()).tolist() == [12, 12]


def test_other_sizes_that_divide_evenly(micro):
    preds, masks = micro(_inputs(1, 48), masking=_visible(20))  # 6x6 grid, pos_emb resampled from 4x4
    assert preds["rgb"].shape == (1, 3, 48, 48) and preds["semseg"].shape == (1, NUM_CLASSES, 12, 12)
    assert masks["semseg"].shape == (1, 36)
    model16 = build_pretrain_multimae(
        size="micro",
        image_size=64,
        patch_size=16,
        extra_norm_pix_loss=False,
        masking={"num_encoded_tokens": 10},
    )
    preds, _ = model16(_inputs(1, 64))
    assert preds["rgb"].shape == (1, 3, 64, 64) and preds["semseg"].shape == (1, NUM_CLASSES, 16, 16)
    assert model16.input_adapters["semseg"].proj.kernel_size == (4, 4)


def test_non_dividing_size_names_the_modality(micro):
    with pytest.raises(ValueError, match=r"rgb: input size 36x36 .* patch size 8x8"):
        micro(_inputs(1, 36), masking=_visible(4))
    x = _inputs(1, 32)
    x["semseg"] = torch.randint(0, NUM_CLASSES, (1, 12, 12))
    with pytest.raises(ValueError, match="semseg: expected spatial size 8x8"):
        micro(x, masking=_visible(4))


def test_invalid_token_budget_and_missing_modality(micro):
    for bad in (0, 49):
        with pytest.raises(ValueError, match="num_encoded_tokens"):
            micro(_inputs(1, 32), masking=_visible(bad))
    with pytest.raises(ValueError, match="none of the input modalities"):
        micro({"normals": torch.randn(1, 3, 32, 32)})


def test_subset_of_inputs_and_image_size_from_semseg(micro):
    x = _inputs(2, 32)
    preds, masks = micro({"semseg": x["semseg"]}, masking=_visible(6))
    assert list(masks) == ["semseg"]
    assert preds["rgb"].shape == (2, 3, 32, 32)  # image size = semseg size x stride
    preds, masks = micro({"rgb": x["rgb"]}, masking=_visible(6))
    assert preds["semseg"].shape == (2, NUM_CLASSES, 8, 8)  # non-input task decoded from mask queries


def test_token_order_follows_adapters_not_input_dict(micro):
    x = _inputs(2, 32)
    reordered = {k: x[k] for k in ("semseg", "depth", "rgb")}
    a = micro.forward_features(x, generator=torch.Generator().manual_seed(1))
    b = micro.forward_features(reordered, generator=torch.Generator().manual_seed(1))
    assert list(b.input_info.tasks) == ["rgb", "depth", "semseg"]
    assert b.input_info.tasks["depth"] == TaskTokens(num_tokens=16, start_idx=16, end_idx=32)
    assert torch.equal(a.masks.ids_keep, b.masks.ids_keep)
    assert torch.allclose(a.tokens, b.tokens)


def test_mask_seeds_make_scoring_independent_of_batch(micro):
    x = _inputs(3, 32)
    seeds = torch.tensor([11, 12, 13])
    with torch.no_grad():
        full, full_masks = micro(x, seeds)
        sub = {k: v[[2, 0]] for k, v in x.items()}
        part, part_masks = micro(sub, seeds[[2, 0]])
    assert torch.equal(full_masks["depth"][[2, 0]], part_masks["depth"])
    assert torch.allclose(full["rgb"][[2, 0]], part["rgb"], atol=1e-5)
    assert torch.allclose(full["semseg"][[2, 0]], part["semseg"], atol=1e-5)


def test_unmasked_forward_and_user_masks(micro):
    x = _inputs(2, 32)
    with torch.no_grad():
        preds, masks = micro(x, mask_inputs=False)
        zero_masks = {t: torch.zeros(2, 16, dtype=torch.long) for t in masks}
        same, _ = micro(x, task_masks=zero_masks)
    assert all(int(m.sum()) == 0 for m in masks.values())
    assert torch.allclose(preds["depth"], same["depth"], atol=1e-5)  # no randomness when nothing is masked
    user = {t: torch.ones(2, 16, dtype=torch.long) for t in ("rgb", "depth", "semseg")}
    user["rgb"][:, :3] = 0
    user["depth"][0, 5] = 0
    user["semseg"][1, 7] = 0
    feats = micro.forward_features(x, task_masks=user)
    assert feats.tokens.shape == (2, 4 + 1, 128)  # 4 visible per sample plus the global token
    assert feats.masks.ids_keep.tolist() == [[0, 1, 2, 21], [0, 1, 2, 39]]


def test_fp32_output_adapters_under_autocast(micro):
    assert micro.fp32_output_adapters == ("semseg",)  # the builder's default: the class-id outputs
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        preds, _ = micro(_inputs(1, 32), masking=_visible(8))
    assert preds["semseg"].dtype == torch.float32
    assert preds["rgb"].dtype == torch.bfloat16
    none = build_pretrain_multimae(size="micro", image_size=32, patch_size=8, fp32_output_adapters=[])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert none(_inputs(1, 32), masking=_visible(8))[0]["semseg"].dtype == torch.bfloat16


# ---------------------------------------------------------------- masking settings owned by the model


def test_model_masks_with_its_own_masking_config(micro):
    x = _inputs(3, 32)
    seeds = torch.tensor([4, 5, 6])
    counts = {t: 16 for t in ("rgb", "depth", "semseg")}
    for masking in (
        micro.masking,
        MaskingConfig(num_encoded_tokens=20, alphas=(0.5, 1.0, 2.0), tie_break_noise=False),
        MaskingConfig(num_encoded_tokens=9, sample_tasks_uniformly=True),
    ):
        expected = generate_random_masks(
            counts,
            batch_size=3,
            num_encoded_tokens=masking.num_encoded_tokens,
            alphas=masking.alphas,
            sample_tasks_uniformly=masking.sample_tasks_uniformly,
            tie_break_noise=masking.tie_break_noise,
            mask_seeds=seeds,
        )
        with torch.no_grad():
            got = micro.forward_features(x, seeds, masking=masking).masks
        assert torch.equal(got.ids_keep, expected.ids_keep)
        assert all(torch.equal(got.task_masks[t], expected.task_masks[t]) for t in counts)
    assert micro.masking == MaskingConfig(num_encoded_tokens=12)  # a per-call override changes nothing
    assert "masking" not in "".join(micro.state_dict())  # settings, not weights: checkpoints are unchanged


def test_masking_config_is_frozen_and_checked():
    config = MaskingConfig(num_encoded_tokens=32, alphas=[1, 2])
    assert config.alphas == (1.0, 2.0) and hash(config)  # a list (or Hydra ListConfig) becomes a tuple
    with pytest.raises(AttributeError):
        config.num_encoded_tokens = 3
    for bad in (dict(num_encoded_tokens=0), dict(num_encoded_tokens=2.5), dict(alphas=0.0), dict(alphas=[])):
        with pytest.raises(ValueError):
            MaskingConfig(**bad)


def test_masking_comes_from_the_model_config(compose_cfg):
    import hydra

    cfg = compose_cfg("model.net.masking.tie_break_noise=false", "model.net.masking.alphas=[0.5,1,2]")
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert module.net.masking == MaskingConfig(
        num_encoded_tokens=32, alphas=(0.5, 1.0, 2.0), tie_break_noise=False
    )
    assert module.net.fp32_output_adapters == ("semseg",)
    assert list(module.losses) == ["rgb", "depth", "semseg", "norm_rgb"]


# ---------------------------------------------------------------- output adapter semantics


def _tiny_decoder(**kwargs) -> SpatialOutputAdapter:
    torch.manual_seed(0)
    adapter = SpatialOutputAdapter(
        num_channels=2, stride_level=1, patch_size_full=4, dim_tokens=8, num_heads=2, image_size=8, **kwargs
    )
    adapter.init(dim_tokens_enc=8)
    return adapter


def test_decoder_queries_and_context_embeddings():
    adapter = _tiny_decoder(depth=0, task="rgb", context_tasks=["rgb"])
    info = InputInfo(
        tasks={"rgb": TaskTokens(4, 0, 4)}, image_size=(8, 8), num_task_tokens=4, num_global_tokens=1
    )
    tokens = torch.randn(1, 3, 8)  # 2 visible (ids 0, 2) + 1 global
    ids_keep = torch.tensor([[0, 2]])
    ids_restore = torch.tensor([[0, 2, 1, 3]])  # shuffled order [0, 2, 1, 3] -> restore
    q, ctx = adapter.queries_and_context(tokens, info, ids_keep, ids_restore)
    pos = adapter.pos_emb.flatten(2).transpose(1, 2)[0]  # [4, D]
    emb = adapter.task_embeddings["rgb"][0, 0]
    assert torch.allclose(q[0, 0], tokens[0, 0] + emb + pos[0])  # visible token with embeddings
    assert torch.allclose(q[0, 1], adapter.mask_token[0, 0] + emb + pos[1])  # masked position
    assert torch.allclose(q[0, 2], tokens[0, 1] + emb + pos[2])
    assert torch.allclose(ctx[0, :2], torch.stack([q[0, 0], q[0, 2]]))  # visible tokens keep their embeddings
    assert torch.equal(ctx[0, 2], tokens[0, 2])  # global token re-appended without embeddings


def test_decoder_queries_for_non_input_task_and_no_context_tasks():
    adapter = _tiny_decoder(depth=0, task="depth", context_tasks=["rgb", "depth"])
    info = InputInfo(
        tasks={"rgb": TaskTokens(4, 0, 4)}, image_size=(8, 8), num_task_tokens=4, num_global_tokens=1
    )
    q, _ = adapter.queries_and_context(
        torch.randn(2, 3, 8), info, torch.tensor([[0, 1]] * 2), torch.arange(4).repeat(2, 1)
    )
    pos = adapter.pos_emb.flatten(2).transpose(1, 2)
    assert torch.allclose(q, (adapter.mask_token + pos + adapter.task_embeddings["depth"]).expand(2, -1, -1))
    # Without task embeddings (the reference then fails in forward).
    bare = _tiny_decoder(depth=1, task="rgb", context_tasks=None)
    assert not any("task_embeddings" in k for k in bare.state_dict())
    out = bare(torch.randn(2, 3, 8), info, torch.tensor([[0, 1]] * 2), torch.arange(4).repeat(2, 1))
    assert out.shape == (2, 2, 8, 8)


def test_decoder_has_no_query_residual_around_cross_attention():
    adapter = _tiny_decoder(depth=0, task="rgb", context_tasks=["rgb"])
    with torch.no_grad():
        for layer in (adapter.decoder.proj, adapter.mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()
        adapter.out_proj.bias.copy_(torch.arange(32.0))
    info = InputInfo(
        tasks={"rgb": TaskTokens(4, 0, 4)}, image_size=(8, 8), num_task_tokens=4, num_global_tokens=1
    )
    out = adapter(torch.randn(2, 5, 8), info, torch.arange(4).repeat(2, 1), torch.arange(4).repeat(2, 1))
    # With the attention output zeroed, a query residual would leak the queries into the prediction.
    assert torch.allclose(out, adapter.unpatchify(adapter.out_proj.bias.expand(2, 4, 32), (2, 2)))


def test_input_adapters_validate_and_use_their_interpolation():
    rgb = PatchedInputAdapter(
        num_channels=3, stride_level=1, patch_size_full=8, image_size=32, modality="rgb"
    )
    rgb.init(16)
    assert not rgb.pos_emb.requires_grad and rgb.pos_emb.shape == (1, 16, 4, 4)
    x = torch.randn(1, 3, 48, 40)
    tokens = rgb(x)
    expected = rgb.proj(x).flatten(2).transpose(1, 2) + F.interpolate(
        rgb.pos_emb, size=(6, 5), mode="bicubic", align_corners=False
    ).flatten(2).transpose(1, 2)
    assert torch.allclose(tokens, expected, atol=1e-6)
    seg = SemSegInputAdapter(
        num_classes=5, stride_level=4, patch_size_full=8, image_size=32, learnable_pos_emb=True
    )
    seg.init(16)
    assert seg.pos_emb.requires_grad and seg.class_emb.weight.shape == (5, 64)
    labels = torch.randint(0, 5, (1, 12, 12))
    emb = seg.class_emb(labels).permute(0, 3, 1, 2)
    expected = seg.proj(emb).flatten(2).transpose(1, 2) + F.interpolate(
        seg.pos_emb, size=(6, 6), mode="bilinear", align_corners=False
    ).flatten(2).transpose(1, 2)
    assert torch.allclose(seg(labels), expected, atol=1e-6)
    with pytest.raises(ValueError, match="SemSegInputAdapter: input size 9x12"):
        seg(torch.randint(0, 5, (1, 9, 12)))
    padded = SemSegInputAdapter(num_classes=133, emb_padding_idx=133)
    padded.init(16)
    assert padded.class_emb.weight.shape == (134, 64)


# ---------------------------------------------------------------- initialisation and weight decay


def _xavier_std(weight: torch.Tensor) -> float:
    return math.sqrt(2.0 / (weight.shape[0] + weight.shape[1]))


def test_weight_init_follows_reference(micro):
    fc1 = micro.encoder[0].mlp.fc1
    assert torch.count_nonzero(fc1.bias) == 0
    assert fc1.weight.std().item() == pytest.approx(_xavier_std(fc1.weight), rel=0.1)
    for qkv in (micro.encoder[1].attn.qkv, micro.output_adapters["rgb"].decoder_transformer[0].attn.qkv):
        out_dim, in_dim = qkv.weight.shape
        bound = math.sqrt(6.0 / (out_dim // 3 + in_dim))
        assert qkv.weight.abs().max() <= bound
        assert qkv.weight.abs().max() > math.sqrt(6.0 / (out_dim + in_dim))  # wider than plain xavier
    kv = micro.output_adapters["depth"].decoder.kv
    assert kv.weight.abs().max() <= math.sqrt(6.0 / (kv.weight.shape[0] // 2 + kv.weight.shape[1]))
    assert kv.weight.abs().max() > math.sqrt(6.0 / sum(kv.weight.shape))
    for module in micro.modules():
        if isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    conv = micro.input_adapters["rgb"].proj.weight  # xavier on (D, C·P·P)
    assert conv.abs().max() <= math.sqrt(6.0 / (conv.shape[0] + conv[0].numel()))
    assert conv.flatten(1).std().item() == pytest.approx(_xavier_std(conv.flatten(1)), rel=0.1)
    out_proj = micro.output_adapters["semseg"].out_proj  # xavier-overwritten too, as in the reference
    assert out_proj.weight.std().item() == pytest.approx(_xavier_std(out_proj.weight), rel=0.1)
    assert micro.input_adapters["semseg"].class_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.count_nonzero(micro.output_adapters["rgb"].mask_token) == 0
    assert 0.005 < micro.global_tokens.std().item() < 0.04


def test_no_weight_decay_names_exist_and_are_exempted(micro):
    names = micro.no_weight_decay()
    params = dict(micro.named_parameters())
    assert names <= set(params)
    for expected in (
        "global_tokens",
        "input_adapters.rgb.pos_emb",
        "input_adapters.semseg.class_emb.weight",
        "output_adapters.semseg.mask_token",
        "output_adapters.rgb.pos_emb",
        "output_adapters.norm_rgb.task_embeddings.depth",
    ):
        assert expected in names
    groups = timm.optim.param_groups_weight_decay(micro, 0.05, no_weight_decay_list=names)
    no_decay = next(g for g in groups if g["weight_decay"] == 0.0)["params"]
    assert any(p is params["input_adapters.semseg.class_emb.weight"] for p in no_decay)
    assert any(p is params["output_adapters.rgb.task_embeddings.rgb"] for p in no_decay)


def test_model_is_built_with_typed_keyword_constructor():
    with pytest.raises(TypeError):
        MultiMAE({"rgb": PatchedInputAdapter(num_channels=3)})  # keyword-only
