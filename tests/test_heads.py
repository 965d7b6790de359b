"""Fine-tuning heads and the MultiViT model: shapes, pooling, DPT geometry, init and layer-decay groups."""

from functools import partial

import pytest
import torch

from attent_vision.lightning.optim import build_optimizer, warmup_cosine_lr, warmup_cosine_scheduler
from attent_vision.models import (
    ConvNeXtHead,
    DPTHead,
    InputInfo,
    LinearHead,
    MultiViT,
    TaskTokens,
    build_multivit,
    dpt_feature_dim,
    dpt_hooks,
    dpt_layer_dims,
)

MICRO = {"size": "micro", "patch_size": 8, "image_size": 64}  # dim 128, depth 4


def _micro(**kwargs) -> MultiViT:
    torch.manual_seed(0)
    return build_multivit(**{**MICRO, **kwargs}).eval()


def _info(grid: tuple[int, int], patch: int, tasks=("rgb",), num_global: int = 1) -> InputInfo:
    n = grid[0] * grid[1]
    layout = {t: TaskTokens(num_tokens=n, start_idx=i * n, end_idx=(i + 1) * n) for i, t in enumerate(tasks)}
    return InputInfo(
        tasks=layout,
        image_size=(grid[0] * patch, grid[1] * patch),
        num_task_tokens=n * len(tasks),
        num_global_tokens=num_global,
    )


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_micro_heads_output_shapes(size):
    model = _micro(
        in_domains=("rgb", "depth"),
        heads={
            "cls": partial(LinearHead, num_classes=10),
            "semseg": partial(ConvNeXtHead, num_classes=5, main_tasks=("rgb", "depth")),
            "depth": partial(DPTHead),
        },
    )
    x = {"rgb": torch.randn(2, 3, *size), "depth": torch.randn(2, 1, *size)}
    with torch.no_grad():
        out = model(x)
    assert out["cls"].shape == (2, 10)
    assert out["semseg"].shape == (2, 5, *size)
    assert out["depth"].shape == (2, 1, *size)
    semseg = model.output_adapters["semseg"]
    assert semseg.embed_dim == 8 * 128 and semseg.class_dim == 64  # 8·D default scaled to micro
    assert semseg.proj_dec.in_features == 2 * 128  # two main tasks concatenated
    dpt = model.output_adapters["depth"]
    assert (dpt.hooks, dpt.layer_dims, dpt.feature_dim) == ([0, 1, 2, 3], [16, 32, 64, 128], 48)


def test_forward_encoder_all_layers_and_no_masking():
    model = _micro()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, info = model.forward_encoder(x, return_all_layers=False)
        layers, _ = model.forward_encoder({"rgb": x}, return_all_layers=True)
    assert final.shape == (2, 8 * 12 + 1, 128)  # every token encoded, global token last
    assert info.tasks["rgb"].num_tokens == 96 and info.image_size == (64, 96)
    assert len(layers) == 4 and torch.equal(layers[-1], final)


def test_linear_head_pooling_variants():
    torch.manual_seed(0)
    tokens = torch.randn(3, 16 + 1, 32)
    info = _info((4, 4), 8)
    heads = {
        p: LinearHead(num_classes=4, dim_tokens_enc=32, pooling=p)
        for p in ("mean_all", "mean_patch", "global")
    }
    state = heads["mean_all"].state_dict()
    for head in heads.values():
        head.load_state_dict(state)  # same weights, only the pooling differs
    with torch.no_grad():
        out = {p: h(tokens, info) for p, h in heads.items()}
        apply = heads["global"]
        assert torch.allclose(out["global"], apply.head(apply.norm(tokens[:, -1])))
        assert torch.allclose(out["mean_all"], apply.head(apply.norm(tokens.mean(1))))
        assert torch.allclose(out["mean_patch"], apply.head(apply.norm(tokens[:, :16].mean(1))))
    assert not torch.allclose(out["mean_all"], out["mean_patch"])
    with pytest.raises(ValueError, match="pooling"):
        LinearHead(num_classes=4, dim_tokens_enc=32, pooling="max")


def test_heads_keep_their_own_init():
    model = build_multivit(
        **MICRO,
        heads={
            "cls": partial(LinearHead, num_classes=100),
            "tiny": partial(LinearHead, num_classes=100, init_scale=0.001),
            "semseg": partial(ConvNeXtHead, num_classes=3),
        },
    )
    head = model.output_adapters["cls"].head
    # trunc-normal(0.02), not xavier (std sqrt(2 / (128 + 100)) ≈ 0.094) as the reference's re-init gives
    assert 0.017 < head.weight.std().item() < 0.023
    assert torch.count_nonzero(head.bias) == 0
    assert model.output_adapters["tiny"].head.weight.abs().max().item() < 0.001
    assert 0.017 < model.output_adapters["semseg"].proj_dec.weight.std().item() < 0.023
    before = {k: v.clone() for k, v in model.output_adapters.state_dict().items()}
    qkv_before = model.encoder[0].attn.qkv.weight.clone()
    model.init_weights()  # re-initialises the encoder only
    assert all(torch.equal(v, before[k]) for k, v in model.output_adapters.state_dict().items())
    assert not torch.equal(model.encoder[0].attn.qkv.weight, qkv_before)


def test_convnext_head_validation():
    with pytest.raises(ValueError, match="square"):
        ConvNeXtHead(num_classes=2, dim_tokens_enc=32, patch_size=8, preds_per_patch=8)
    with pytest.raises(ValueError, match="divisible"):
        ConvNeXtHead(num_classes=2, dim_tokens_enc=32, patch_size=8, embed_dim=100, preds_per_patch=16)
    head = ConvNeXtHead(num_classes=2, dim_tokens_enc=32, patch_size=8, main_tasks=("depth",))
    with pytest.raises(ValueError, match="main task 'depth'"):
        head(torch.randn(1, 17, 32), _info((4, 4), 8))


def test_dpt_defaults_follow_the_encoder():
    assert dpt_hooks(12) == [2, 5, 8, 11]
    assert dpt_hooks(24) == [5, 11, 17, 23]
    assert dpt_hooks(4) == [0, 1, 2, 3]
    assert dpt_layer_dims(768) == [96, 192, 384, 768]
    assert [dpt_feature_dim(d) for d in (128, 192, 384, 768, 1024)] == [48, 64, 128, 256, 256]
    with torch.device("meta"):  # base geometry, no allocation
        base = DPTHead(dim_tokens_enc=768, patch_size=16, encoder_depth=12)
    assert (base.hooks, base.layer_dims, base.feature_dim) == ([2, 5, 8, 11], [96, 192, 384, 768], 256)
    assert base.act_postprocess[0][0].in_channels == 768


def test_dpt_reads_exactly_its_hooks_on_a_24_layer_encoder():
    torch.manual_seed(0)
    head = DPTHead(dim_tokens_enc=32, patch_size=16, encoder_depth=24, feature_dim=16).eval()
    assert head.hooks == [5, 11, 17, 23]
    info = _info((3, 5), 16)  # odd, non-square grid
    layers = [torch.randn(1, 15 + 1, 32) for _ in range(24)]
    with torch.no_grad():
        ref = head(layers, info)
        assert ref.shape == (1, 1, 48, 80)  # native DPT resolution = image at patch 16
        unhooked = list(layers)
        unhooked[6] = torch.randn_like(layers[6])
        assert torch.equal(head(unhooked, info), ref)
        hooked = list(layers)
        hooked[17] = torch.randn_like(layers[17])
        assert not torch.allclose(head(hooked, info), ref)
    with pytest.raises(ValueError, match="all 24 encoder layers"):
        head(layers[:12], info)


@pytest.mark.parametrize("hooks", [[0, 1, 2], [0, 2, 1, 3], [0, 1, 1, 3], [0, 1, 2, 4]])
def test_dpt_rejects_bad_hooks(hooks):
    with pytest.raises(ValueError, match=r"hooks .*\[" + ", ".join(map(str, hooks))):
        DPTHead(dim_tokens_enc=32, patch_size=8, encoder_depth=4, hooks=hooks)


def test_layer_decay_groups_match_reference_scales():
    model = _micro(heads={"cls": partial(LinearHead, num_classes=3)})
    ld, depth = 0.65, 4
    opt = build_optimizer(torch.optim.AdamW, model, lr=1.0, weight_decay=0.05, layer_decay=ld)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert scale[id(params["input_adapters.rgb.proj.weight"])] == pytest.approx(ld ** (depth + 1))
    assert scale[id(params["global_tokens"])] == pytest.approx(ld ** (depth + 1))
    for i in range(depth):  # encoder.i is layer i + 1: ld^(L + 1 − (i + 1))
        assert scale[id(params[f"encoder.{i}.attn.qkv.weight"])] == pytest.approx(ld ** (depth - i))
    assert scale[id(params["output_adapters.cls.head.weight"])] == pytest.approx(1.0)
    assert decay[id(params["global_tokens"])] == 0.0  # no_weight_decay() full names
    assert decay[id(params["encoder.0.attn.qkv.weight"])] == 0.05
    assert "input_adapters.rgb.pos_emb" not in {n for n, p in model.named_parameters() if p.requires_grad}


def test_layer_decay_scales_every_groups_learning_rate_at_every_step():
    # torch's schedulers multiply each group's own lr and ignore timm's "lr_scale": the scale must be in the lr.
    model = _micro(heads={"cls": partial(LinearHead, num_classes=3)})
    lr, ld, total, warmup = 2e-3, 0.65, 12, 3
    opt = build_optimizer(torch.optim.AdamW, model, lr=lr, weight_decay=0.05, layer_decay=ld)
    scheduler = warmup_cosine_scheduler(opt, total_steps=total, warmup_steps=warmup, min_ratio=0.1)[
        "scheduler"
    ]
    assert len({g["lr_scale"] for g in opt.param_groups}) == 6  # 4 blocks, the embeddings, the head
    for step in range(total):
        relative = warmup_cosine_lr(step, base_lr=1.0, min_lr=0.1, warmup_steps=warmup, total_steps=total)
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(lr * group["lr_scale"] * relative), (step, group["lr_scale"])
        opt.step()
        scheduler.step()


def test_builder_passes_only_accepted_encoder_settings():
    calls = {}

    def factory(*, num_classes: int, dim_tokens_enc: int) -> LinearHead:
        calls.update(num_classes=num_classes, dim_tokens_enc=dim_tokens_enc)
        return LinearHead(num_classes=num_classes, dim_tokens_enc=dim_tokens_enc)

    model = build_multivit(**MICRO, heads={"cls": partial(factory, num_classes=7)})
    assert calls == {"num_classes": 7, "dim_tokens_enc": 128}
    assert isinstance(model.output_adapters["cls"], LinearHead)
    with pytest.raises(ValueError, match="patch_size=16"):
        build_multivit(**MICRO, heads={"d": partial(DPTHead, patch_size=16)})
    with pytest.raises(ValueError, match="depth"):
        build_multivit(**MICRO, heads={"s": partial(ConvNeXtHead, num_classes=2, main_tasks=("depth",))})
