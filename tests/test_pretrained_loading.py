"""Fine-tuning initialisation: checkpoint resolution, load_pretrained surgery and errors, timm interop."""

import argparse
import json
import os
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from attent_vision.models import (
    ConvNeXtHead,
    LinearHead,
    MissingEncoderWeightsError,
    MultiMAE,
    MultiViT,
    build_multivit,
    load_pretrained,
    multimae_to_timm_vit,
    resolve_checkpoint,
)

from .conftest import tiny_multimae

REPORT_FIELDS = {"source", "format", "loaded", "missing", "unexpected", "resized", "skipped"}


def _pretrain(**kwargs) -> MultiMAE:
    return tiny_multimae(image_size=64, **kwargs)


def _finetune(**kwargs) -> MultiViT:
    torch.manual_seed(1)
    settings = dict(
        size="micro",
        patch_size=8,
        image_size=64,
        in_domains=("rgb", "depth"),
        heads={"cls": partial(LinearHead, num_classes=5)},
    )
    return build_multivit(**{**settings, **kwargs})


@pytest.fixture(scope="module")
def pretrained() -> dict[str, torch.Tensor]:
    return _pretrain().state_dict()  # rgb + depth + semseg in and out, plus norm_rgb


def _encoder_keys(model: torch.nn.Module) -> list[str]:
    return [k for k in model.state_dict() if not k.startswith("output_adapters.")]


def test_lightning_checkpoint_loads_encoder_and_writes_report(pretrained, tmp_path):
    path = tmp_path / "epoch_003.ckpt"
    torch.save({"state_dict": {"net." + k: v for k, v in pretrained.items()}, "epoch": 3}, path)
    model = _finetune()
    report_path = tmp_path / "load_report.json"
    report = load_pretrained(model, path, report_path=report_path)

    state = model.state_dict()
    for key in _encoder_keys(model):
        assert torch.equal(state[key], pretrained[key]), key
    assert report.format == "lightning" and report.source == str(path)
    assert sorted(report.loaded) == sorted(_encoder_keys(model))
    assert report.missing == [k for k in state if k.startswith("output_adapters.cls.")]
    assert sorted(report.skipped) == sorted(k for k in pretrained if k.startswith("output_adapters."))
    assert report.unexpected and all(k.startswith("input_adapters.semseg.") for k in report.unexpected)
    assert report.resized == []
    written = json.loads(report_path.read_text())
    assert set(written) == REPORT_FIELDS
    assert written["format"] == "lightning" and written["missing"] == report.missing


def test_run_directory_resolution(pretrained, tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    for epoch in (0, 1):
        torch.save(
            {"state_dict": {"net." + k: v for k, v in pretrained.items()}}, ckpts / f"epoch_{epoch:03d}.ckpt"
        )
    (ckpts / "last.ckpt").symlink_to("epoch_000.ckpt")  # relative link, as Lightning's save_last="link"
    assert resolve_checkpoint(run) == (ckpts / "epoch_000.ckpt").resolve()
    assert resolve_checkpoint(ckpts / "epoch_001.ckpt") == ckpts / "epoch_001.ckpt"
    assert load_pretrained(_finetune(), run).source == str((ckpts / "epoch_000.ckpt").resolve())

    (ckpts / "last.ckpt").unlink()
    (ckpts / "last.ckpt").symlink_to("epoch_009.ckpt")  # dangling: falls back to the newest epoch file
    assert resolve_checkpoint(run) == ckpts / "epoch_001.ckpt"

    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"last\.ckpt"):
        load_pretrained(_finetune(), tmp_path / "empty")


def test_reference_checkpoint_with_module_prefix(pretrained, tmp_path):
    path = tmp_path / "multimae-b_rgb+-depth-semseg.pth"
    encoder_only = {"module." + k: v for k, v in pretrained.items() if not k.startswith("output_adapters.")}
    torch.save({"model": encoder_only, "epoch": "best", "args": argparse.Namespace(lr=1e-4)}, path)
    model = _finetune()
    report = load_pretrained(model, path)
    assert report.format == "multimae" and report.skipped == []
    assert torch.equal(model.encoder[3].mlp.fc2.weight, pretrained["encoder.3.mlp.fc2.weight"])


def test_semseg_class_emb_padded_and_pos_emb_resampled():
    source = _pretrain(
        in_domains=("rgb", "semseg"), out_domains=("rgb",), semseg_num_classes=133
    ).state_dict()
    model = _finetune(
        in_domains=("rgb", "semseg"),
        image_size=96,
        semseg_num_classes=133,
        heads={"semseg": partial(ConvNeXtHead, num_classes=3, embed_dim=256)},
    )
    report = load_pretrained(model, {"model": source})
    class_emb = model.input_adapters["semseg"].class_emb.weight
    assert class_emb.shape == (134, 64)
    assert torch.equal(class_emb[:133], source["input_adapters.semseg.class_emb.weight"])
    assert torch.count_nonzero(class_emb[133]) == 0
    expected = F.interpolate(
        source["input_adapters.rgb.pos_emb"], size=(12, 12), mode="bicubic", align_corners=False
    )
    assert torch.allclose(model.input_adapters["rgb"].pos_emb, expected, atol=1e-6)
    assert sorted(report.resized) == [
        "input_adapters.rgb.pos_emb: (1, 128, 8, 8) -> (1, 128, 12, 12)",
        "input_adapters.semseg.class_emb.weight: (133, 64) -> (134, 64)",
        "input_adapters.semseg.pos_emb: (1, 128, 8, 8) -> (1, 128, 12, 12)",
    ]
    with torch.no_grad():
        out = model({"rgb": torch.randn(1, 3, 96, 96), "semseg": torch.randint(0, 134, (1, 24, 24))})
    assert out["semseg"].shape == (1, 3, 96, 96)


def test_missing_encoder_keys_raise_with_source_and_keys(pretrained, tmp_path):
    path = tmp_path / "truncated.pth"
    torch.save({"model": {k: v for k, v in pretrained.items() if not k.startswith("encoder.3.")}}, path)
    with pytest.raises(MissingEncoderWeightsError) as err:
        load_pretrained(_finetune(), path)
    message = str(err.value)
    assert str(path) in message and "encoder.3.norm1.weight" in message
    assert "missing (12)" in message and "... and 2 more" in message and "Hint:" in message
    assert len(err.value.missing) == 12 and isinstance(err.value, ValueError)


def test_size_mismatch_names_both_encoders(pretrained):
    tiny = _finetune(size="tiny")
    with pytest.raises(
        MissingEncoderWeightsError, match=r"(?s)micro \(width 128, 4 blocks\).*tiny \(width 192, 12 blocks\)"
    ):
        load_pretrained(tiny, pretrained)
    deeper = {
        **pretrained,
        **{
            k.replace("encoder.3.", "encoder.4."): v
            for k, v in pretrained.items()
            if k.startswith("encoder.3.")
        },
    }
    with pytest.raises(MissingEncoderWeightsError, match=r"(?s)blocks the model lacks.*width 128, 5 blocks"):
        load_pretrained(_finetune(), deeper)


def test_missing_input_modality_gets_a_hint():
    rgb_only = _pretrain(in_domains=("rgb",), out_domains=("rgb",)).state_dict()
    with pytest.raises(
        MissingEncoderWeightsError, match=r"(?s)input_adapters\.depth\.proj\.weight.*in_domains"
    ):
        load_pretrained(_finetune(in_domains=("rgb", "depth")), rgb_only)


def test_timm_state_dict_is_converted():
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, num_classes=0
    )
    state = vit.state_dict()
    model = _finetune(in_domains=("rgb",))
    report = load_pretrained(model, state)
    assert report.format == "timm"
    assert torch.equal(model.global_tokens, state["cls_token"] + state["pos_embed"][:, :1])
    assert torch.equal(model.encoder[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])


def test_fine_tuned_heads_reload_into_the_same_heads():
    source = _finetune(heads={"cls": partial(LinearHead, num_classes=5)})
    target = _finetune(
        heads={"cls": partial(LinearHead, num_classes=5), "other": partial(LinearHead, num_classes=2)}
    )
    report = load_pretrained(target, source.state_dict())
    assert report.skipped == [] and all(k.startswith("output_adapters.other.") for k in report.missing)
    assert torch.equal(target.output_adapters["cls"].head.weight, source.output_adapters["cls"].head.weight)
    wrong = _finetune(heads={"cls": partial(LinearHead, num_classes=7)})  # same task, another head shape
    report = load_pretrained(wrong, source.state_dict())
    assert sorted(report.skipped) == sorted(
        k for k in source.state_dict() if k.startswith("output_adapters.cls.")
    )


def test_multivit_encoder_exports_to_timm_vit(monkeypatch):
    """Interop: our encoder, converted with multimae_to_timm_vit, is a timm ViT with the same features."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # pretrained=False never downloads; make sure of it
    model = _finetune(in_domains=("rgb",)).eval()
    with torch.no_grad():
        model.global_tokens.normal_()  # a distinctive global token
    vit = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=64,
        patch_size=8,
        embed_dim=128,
        depth=4,
        num_heads=4,
        num_classes=0,
        class_token=True,  # cls first, with pos_embed[:, 0] = 0 from the converter
        no_embed_class=False,
        final_norm=False,  # MultiMAE has no final LayerNorm
    ).eval()
    result = vit.load_state_dict(multimae_to_timm_vit(model.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, _ = model.forward_encoder({"rgb": x})  # [B, 64 + 1, D], global token last
        theirs = vit.forward_features(x)  # [B, 1 + 64, D], cls first
    assert theirs.shape == (2, 65, 128)
    assert torch.allclose(ours[:, :64], theirs[:, 1:], atol=1e-5)
    assert torch.allclose(ours[:, 64], theirs[:, 0], atol=1e-5)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_report_is_json_serialisable(tmp_path, pretrained):
    report = load_pretrained(_finetune(), {"model": pretrained}, report_path=tmp_path / "sub" / "r.json")
    data = json.loads(Path(tmp_path / "sub" / "r.json").read_text())
    assert data == report.to_dict() and data["source"] == "<in-memory>"
