"""``python -m attent_vision.tools.export --format timm``: timm rebuilds the exported encoder from config.json, loads
model.safetensors strictly, and computes our MultiViT's features. Offline: nothing here touches the internet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from timm.models import save_for_hf

from attent_vision.models import build_multivit, load_pretrained
from attent_vision.models.checkpoint_keys import multimae_to_timm_vit
from attent_vision.models.released import RELEASED_WEIGHTS
from attent_vision.tools.export import export_timm, main

from .conftest import ROOT, tiny_multimae


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # timm must find everything locally


def _multimae_state(num_global_tokens: int = 1) -> dict[str, torch.Tensor]:
    net = tiny_multimae(num_global_tokens=num_global_tokens)
    with torch.no_grad():
        net.global_tokens.normal_()  # distinctive global tokens (they start at zero-ish values)
    return net.state_dict()


def _features_match(
    export_dir: Path, source, *, num_global_tokens: int = 1, use_local_dir: bool = True
) -> None:
    """timm's model built from the export computes what our MultiViT loaded from ``source`` computes."""
    config = json.loads((export_dir / "config.json").read_text())
    if use_local_dir:
        vit = timm.create_model(f"local-dir:{export_dir}", pretrained=True)
    else:
        overlay = dict(file=str(export_dir / "model.safetensors"), num_classes=0)
        vit = timm.create_model(
            config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **config["model_args"]
        )
    args = config["model_args"]
    ours = build_multivit(
        size="micro",
        patch_size=args["patch_size"],
        image_size=args["img_size"][0],
        in_domains=("rgb",),
        num_global_tokens=num_global_tokens,
    )
    report = load_pretrained(ours, source)
    assert report.missing == []  # the whole encoder came from the checkpoint, none of it is at its init
    vit.eval(), ours.eval()
    x = torch.randn(2, 3, *([args["img_size"][0]] * 2))
    with torch.no_grad():
        tokens, _ = ours.forward_encoder({"rgb": x})  # [B, N + G, D], global tokens last
        features = vit.forward_features(x)  # [B, G + N, D], cls (+ registers) first
        pooled = vit(x)
    n = tokens.shape[1] - num_global_tokens
    assert features.shape == tokens.shape
    torch.testing.assert_close(features[:, num_global_tokens:], tokens[:, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features[:, :num_global_tokens], tokens[:, n:], atol=1e-5, rtol=1e-5)
    expected = tokens[:, :n].mean(1) if args["global_pool"] == "avg" else tokens[:, n]
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_cli_exports_a_train_run_that_timm_loads_strictly(
    smoke_run: tuple[Path, Path], tmp_path: Path
) -> None:
    _, run_dir = smoke_run  # only read
    out = tmp_path / "timm_export"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "attent_vision.tools.export",
            str(run_dir),
            "--format",
            "timm",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out / 'model.safetensors'}" in proc.stdout and str(out / "config.json") in proc.stdout
    assert f'timm.create_model("local-dir:{out}", pretrained=True)' in proc.stdout
    assert "input_adapters.depth.*" in proc.stdout  # what was left out is said

    config = json.loads((out / "config.json").read_text())
    assert {"architecture", "num_classes", "model_args", "pretrained_cfg"} <= set(config)
    args = config["model_args"]
    assert config["num_classes"] == args["num_classes"] == 0
    assert (args["embed_dim"], args["depth"], args["num_heads"], args["patch_size"]) == (128, 4, 4, 8)
    assert args["final_norm"] is False and args["no_embed_class"] is True and args["class_token"] is True
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    assert "license" not in config["pretrained_cfg"]  # our own run: no licence claimed for the user's weights
    weights = safetensors.torch.load_file(out / "model.safetensors")
    assert "cls_token" in weights and not any(k.startswith(("norm.", "head.", "fc_norm.")) for k in weights)
    _features_match(out, run_dir)
    _features_match(out, run_dir, use_local_dir=False)  # the explicit form with config.json's model_args


def test_timm_loading_of_the_export_is_strict(tmp_path: Path) -> None:
    torch.save({"model": _multimae_state()}, tmp_path / "ckpt.pth")
    export_timm(tmp_path / "ckpt.pth", tmp_path / "good")
    weights = safetensors.torch.load_file(tmp_path / "good" / "model.safetensors")
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    for name, tampered in {
        "extra": {**weights, "extra.weight": torch.zeros(1)},
        "missing": {k: v for k, v in weights.items() if k != "blocks.0.attn.qkv.bias"},
    }.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        safetensors.torch.save_file(tampered, folder / "model.safetensors")
        with pytest.raises(
            RuntimeError, match="extra.weight" if name == "extra" else "blocks.0.attn.qkv.bias"
        ):
            timm.create_model(f"local-dir:{folder}", pretrained=True)
        with pytest.raises(RuntimeError, match="Error"):
            timm.create_model(
                config["architecture"],
                pretrained=True,
                pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), num_classes=0),
                **config["model_args"],
            )


@pytest.mark.parametrize("global_pool", ["avg", "token"])
def test_two_global_tokens_become_cls_and_register(tmp_path: Path, global_pool: str) -> None:
    torch.save({"model": _multimae_state(num_global_tokens=2)}, tmp_path / "ckpt.pth")
    done = export_timm(tmp_path / "ckpt.pth", tmp_path / "out", global_pool=global_pool)
    assert done.model_args["reg_tokens"] == 1 and done.model_args["global_pool"] == global_pool
    _features_match(tmp_path / "out", tmp_path / "ckpt.pth", num_global_tokens=2)


def test_a_release_format_timm_file_exports_with_its_licence(tmp_path: Path, capsys) -> None:
    # The release's timm files hold {'model': timm ViT keys} (multimae2vit converts ckpt['model'] in place), with
    # a zero cls row in pos_embed; the export re-lays it out for no_embed_class and keeps the licence.
    release = RELEASED_WEIGHTS["mae-b-timm"].file
    state = _multimae_state()
    torch.save({"model": multimae_to_timm_vit(state), "epoch": 1599}, tmp_path / release)
    assert main([str(tmp_path / release), "--format", "timm", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "licence: CC-BY-NC 4.0 (non-commercial)" in printed and "(timm checkpoint)" in printed
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["pretrained_cfg"]["license"]
        == "cc-by-nc-4.0"
    )
    _features_match(tmp_path / "out", {"model": state})
    # What timm.models.push_to_hf_hub uploads (docs/model.md) is save_for_hf of the loaded model: the same files.
    vit = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    save_for_hf(vit, tmp_path / "resaved", safe_serialization=True)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "resaved" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


@pytest.mark.slow
def test_cli_help_and_user_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0 and "--format {timm}" in capsys.readouterr().out
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "attent_vision.tools.export",
            str(tmp_path / "nope.pth"),
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: checkpoint source") and "nope.pth does not exist" in proc.stderr

    (tmp_path / "garbage.pth").write_bytes(bytes(range(256)) * 4)
    no_rgb = tmp_path / "depth_only.pth"
    torch.save(
        {"model": {k: v for k, v in _multimae_state().items() if not k.startswith("input_adapters.rgb")}},
        no_rgb,
    )
    custom = tmp_path / "three_blocks.pth"
    torch.save(
        {"model": {k: v for k, v in _multimae_state().items() if not k.startswith("encoder.3.")}}, custom
    )
    for source, message in [
        ("garbage.pth", "garbage.pth: not a PyTorch checkpoint"),
        ("depth_only.pth", "no MultiMAE RGB encoder (inputs ['depth', 'semseg'], 4 encoder blocks)"),
        ("three_blocks.pth", "no known encoder size has width 128 and 3 blocks"),
    ]:
        assert main([str(tmp_path / source), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert "pass --num-heads" in err  # the last one: the head count is not in the weights
    assert not (tmp_path / "out").exists()  # nothing written for a failed export
    assert main([str(custom), "--out", str(tmp_path / "out"), "--num-heads", "4"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_args"]["depth"] == 3
    assert main([str(custom), "--out", str(tmp_path / "out2"), "--num-heads", "3"]) == 2
    assert "--num-heads 3 does not divide the encoder width 128" in capsys.readouterr().err
