"""Checkpoint fidelity: reference schema, tolerant loading and the timm ViT converters."""

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from attent_vision.models import (
    MultiMAE,
    PatchedInputAdapter,
    SemSegInputAdapter,
    build_pretrain_multimae,
    load_pretrained,
    multimae_to_timm_vit,
    timm_vit_to_multimae,
)

SCHEMA = Path(__file__).parent / "assets" / "multimae_base_state_dict_schema.json"


@pytest.fixture(scope="module")
def schema() -> dict[str, list[int]]:
    return json.loads(SCHEMA.read_text())


@pytest.fixture(scope="module")
def base_meta() -> MultiMAE:
    with torch.device("meta"):  # keys and shapes only, no allocation
        return build_pretrain_multimae(
            size="base",
            image_size=224,
            patch_size=16,
            semseg_num_classes=133,
            decoder_dim=256,
            decoder_depth=2,
            decoder_num_heads=8,
            extra_norm_pix_loss=False,
        )


def _micro(image_size: int = 32, **kwargs) -> MultiMAE:
    torch.manual_seed(0)
    return build_pretrain_multimae(size="micro", image_size=image_size, patch_size=8, **kwargs)


def test_base_state_dict_matches_reference_schema(base_meta, schema):
    state = base_meta.state_dict()
    assert len(schema) == 302
    assert {k: list(v.shape) for k, v in state.items()} == schema
    assert sum(torch.Size(s).numel() for s in schema.values()) == pytest.approx(95.75e6, rel=1e-3)


def test_base_loads_synthesised_reference_state_strictly(base_meta, schema):
    state = {k: torch.empty(shape, device="meta") for k, shape in schema.items()}
    result = base_meta.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    prefixed = {"model": {"module." + k: v for k, v in state.items()}, "epoch": 3}
    report = load_pretrained(base_meta, prefixed, strict=True)
    assert report.format == "multimae" and not report.missing and not report.unexpected and not report.skipped


def test_loader_handles_lightning_and_compile_prefixes():
    source = _micro().state_dict()
    target = _micro()
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    ckpt = {
        "state_dict": {
            **{"net._orig_mod." + k: v for k, v in source.items()},
            "balancer.log_vars": torch.zeros(3),
        },
        "epoch": 1,
    }
    report = load_pretrained(target, ckpt)
    assert report.format == "lightning" and report.missing == [] and report.unexpected == []
    assert torch.equal(target.encoder[0].attn.qkv.weight, source["encoder.0.attn.qkv.weight"])


def test_loader_pads_class_emb_and_resamples_pos_emb():
    source = _micro(32, in_domains=("rgb", "semseg"), out_domains=("rgb",)).state_dict()
    target = MultiMAE(
        input_adapters={
            "rgb": PatchedInputAdapter(num_channels=3, patch_size_full=8, image_size=48),
            "semseg": SemSegInputAdapter(
                num_classes=133, stride_level=4, patch_size_full=8, image_size=48, emb_padding_idx=133
            ),
        },
        output_adapters=None,
        dim_tokens=128,
        depth=4,
        num_heads=4,
    )
    report = load_pretrained(target, source)
    assert report.missing == [] and report.unexpected == []
    # The decoders have no place in a model without output adapters: skipped on purpose, whole.
    assert all(k.startswith("output_adapters.") for k in report.skipped) and report.skipped
    assert sorted(r.split(":")[0] for r in report.resized) == [
        "input_adapters.rgb.pos_emb",
        "input_adapters.semseg.class_emb.weight",
        "input_adapters.semseg.pos_emb",
    ]
    assert "input_adapters.semseg.class_emb.weight: (133, 64) -> (134, 64)" in report.resized
    class_emb = target.input_adapters["semseg"].class_emb.weight
    assert class_emb.shape == (134, 64)
    assert torch.equal(class_emb[:133], source["input_adapters.semseg.class_emb.weight"])
    assert torch.count_nonzero(class_emb[133]) == 0
    expected = F.interpolate(
        source["input_adapters.rgb.pos_emb"], size=(6, 6), mode="bicubic", align_corners=False
    )
    assert torch.allclose(target.input_adapters["rgb"].pos_emb, expected, atol=1e-6)


def test_loader_reports_missing_output_adapters_and_shape_mismatches(tmp_path):
    model = _micro()
    encoder_only = {k: v for k, v in model.state_dict().items() if not k.startswith("output_adapters.")}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": encoder_only, "args": argparse.Namespace(epochs=1)}, path)  # reference layout
    report = load_pretrained(model, path)
    assert report.format == "multimae" and report.unexpected == []
    assert report.missing and all(k.startswith("output_adapters.") for k in report.missing)
    bad = dict(model.state_dict())
    bad["output_adapters.rgb.out_proj.weight"] = torch.zeros(5, 256)
    report = load_pretrained(model, bad)
    # A decoder with one misfitting weight is skipped whole, never loaded half.
    rgb_decoder = sorted(k for k in model.state_dict() if k.startswith("output_adapters.rgb."))
    assert sorted(report.skipped) == rgb_decoder and sorted(report.missing) == rgb_decoder
    with pytest.raises(ValueError, match=r"out_proj\.weight"):
        load_pretrained(model, bad, strict=True)


def _timm_vit() -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4, num_classes=0)


def test_multimae_to_timm_loads_and_matches_encoder():
    model = _micro(in_domains=("rgb",), out_domains=("rgb",)).eval()
    state = model.state_dict()
    converted = multimae_to_timm_vit(state)
    assert converted["pos_embed"].shape == (1, 17, 128)
    assert torch.count_nonzero(converted["pos_embed"][:, 0]) == 0
    assert torch.equal(
        converted["pos_embed"][0, 1 + 5], state["input_adapters.rgb.pos_emb"][0, :, 1, 1]
    )  # row-major
    vit = _timm_vit().eval()
    result = vit.load_state_dict(converted, strict=False)
    assert sorted(result.missing_keys) == ["norm.bias", "norm.weight"]
    assert result.unexpected_keys == []
    vit.norm = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.forward_features({"rgb": x}, mask_inputs=False).tokens  # [B, 16 + 1, D], global last
        theirs = vit.forward_features(x)  # [B, 1 + 16, D], cls first
    assert torch.allclose(ours[:, :16], theirs[:, 1:], atol=1e-5)
    assert torch.allclose(ours[:, 16], theirs[:, 0], atol=1e-5)


def test_timm_to_multimae_round_trip_and_no_aliasing():
    state = _micro(in_domains=("rgb",), out_domains=("rgb",)).state_dict()
    back = timm_vit_to_multimae(multimae_to_timm_vit(state))
    assert set(back) == {k for k in state if not k.startswith("output_adapters.")}
    for key, value in back.items():
        assert torch.equal(value, state[key]), key
    timm_state = _timm_vit().state_dict()
    timm_state["pos_embed"][:, 0] = 1.5
    cls_before = timm_state["cls_token"].clone()
    converted = timm_vit_to_multimae(timm_state)
    assert torch.equal(converted["global_tokens"], cls_before + 1.5)  # cls position folded in
    assert torch.equal(timm_state["cls_token"], cls_before)  # source not modified
    converted["global_tokens"].add_(1.0)
    assert torch.equal(timm_state["cls_token"], cls_before)  # and not aliased
    assert converted["input_adapters.rgb.pos_emb"].shape == (1, 128, 4, 4)
    assert not any(k.startswith(("norm", "head", "fc_norm")) for k in converted)
    model = _micro(in_domains=("rgb",), out_domains=("rgb",))
    report = load_pretrained(model, timm_state)  # timm keys are detected and converted
    assert report.format == "timm" and report.unexpected == []
    assert all(k.startswith("output_adapters.") for k in report.missing)
