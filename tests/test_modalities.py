"""The modality registry: every per-modality table derives from it, so a new modality is one entry."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from attent_vision.config import validate_pretrain_config
from attent_vision.data.folder import MultiModalFolder
from attent_vision.data.modalities import MODALITIES, Modality, output_tasks, read_rgb, read_semseg
from attent_vision.data.transforms import MultiModalTransform, to_tensors
from attent_vision.lightning.pretrain import MultiMAEPretrainModule
from attent_vision.models import (
    MaskedCrossEntropyLoss,
    MaskedL1Loss,
    MaskedMSELoss,
    MaskingConfig,
    PatchedInputAdapter,
    SemSegInputAdapter,
    build_multivit,
    build_pretrain_multimae,
    default_loss,
)
from attent_vision.models.task_balancing import NoTaskBalancer


def _normals_tensor(value) -> torch.Tensor:
    """8-bit RGB-coded unit normals → float32 (3, H, W) in [-1, 1]."""
    if isinstance(value, Image.Image):
        value = pil_to_tensor(value.convert("RGB"))
    elif isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value.transpose(2, 0, 1)))
    return value.to(torch.float32) / 127.5 - 1.0


NORMALS = Modality(
    "normals",
    read_rgb,
    _normals_tensor,
    channels=3,
    interpolation="bilinear",
    loss="attent_vision.models.losses.MaskedL1Loss",
)
PARTS = Modality(  # a second class-id map, like semseg
    "parts",
    read_semseg,
    MODALITIES["semseg"].to_tensor,
    channels=1,
    interpolation="nearest-exact",
    loss="attent_vision.models.losses.MaskedCrossEntropyLoss",
    class_ids=True,
)


@pytest.fixture
def normals(monkeypatch: pytest.MonkeyPatch) -> Modality:
    monkeypatch.setitem(MODALITIES, "normals", NORMALS)
    return NORMALS


@pytest.fixture
def parts(monkeypatch: pytest.MonkeyPatch) -> Modality:
    monkeypatch.setitem(MODALITIES, "parts", PARTS)
    return PARTS


def test_default_losses_are_the_reference_ones():
    rgb = default_loss("rgb", patch_size=8, stride=1)
    assert type(rgb) is MaskedMSELoss and not rgb.norm_pix and rgb.scale_factor == 8
    assert type(default_loss("depth", patch_size=8, stride=1)) is MaskedL1Loss
    semseg = default_loss("semseg", patch_size=8, stride=4)
    assert type(semseg) is MaskedCrossEntropyLoss and semseg.scale_factor == 2
    norm_rgb = default_loss(
        "norm_rgb", patch_size=8, stride=1
    )  # the image's loss on per-patch normalised pixels
    assert type(norm_rgb) is MaskedMSELoss and norm_rgb.norm_pix
    with pytest.raises(ValueError, match="unknown modality 'normals'"):
        default_loss("normals", patch_size=8, stride=1)


def test_a_registered_modality_goes_through_data_model_losses_and_config(
    normals: Modality, tmp_path: Path, compose_cfg
) -> None:
    # On disk: read by its registered reader, paired by stem like the others.
    rng = np.random.default_rng(0)
    for name in ("rgb", "normals"):
        (tmp_path / name / "cat").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            tmp_path / name / "cat" / "a.png"
        )
    raw = MultiModalFolder(tmp_path, modalities=("rgb", "normals"))[0]
    assert raw["normals"].shape == (3, 40, 48) and raw["normals"].dtype == torch.float32
    assert float(raw["normals"].min()) >= -1.0 and float(raw["normals"].max()) <= 1.0
    assert torch.equal(
        raw["normals"],
        to_tensors({"normals": np.asarray(read_rgb(tmp_path / "normals/cat/a.png"))})["normals"],
    )

    # Transforms: its own filter, the shared crop and flip.
    folder = MultiModalFolder(
        tmp_path, modalities=("rgb", "normals"), transform=MultiModalTransform(input_size=32)
    )
    torch.manual_seed(0)
    item = folder[0]
    assert list(item)[:2] == ["rgb", "normals"] and item["normals"].shape == (3, 32, 32)
    sample = folder.load(0)
    for seed in range(4):
        torch.manual_seed(seed)
        flipped = MultiModalTransform(input_size=32, hflip=1.0)(sample)
        torch.manual_seed(seed)
        plain = MultiModalTransform(input_size=32, hflip=0.0)(sample)
        assert all(torch.equal(flipped[m], plain[m].flip(-1)) for m in ("rgb", "normals"))

    # Model: a patched 3-channel input and a 3-channel reconstruction.
    net = build_pretrain_multimae(
        size="micro",
        image_size=32,
        patch_size=8,
        in_domains=("rgb", "normals"),
        out_domains=("rgb", "normals"),
        decoder_dim=64,
        decoder_num_heads=2,
        masking=MaskingConfig(num_encoded_tokens=8),
    )
    adapter = net.input_adapters["normals"]
    assert isinstance(adapter, PatchedInputAdapter) and adapter.proj.in_channels == 3
    assert net.output_adapters["normals"].num_channels == 3 and net.fp32_output_adapters == ()
    assert list(
        build_multivit(size="micro", image_size=32, patch_size=8, in_domains=("normals",)).input_adapters
    ) == ["normals"]

    # Losses: the registry's default, used by the pretraining module.
    module = MultiMAEPretrainModule(net=net, task_balancer=NoTaskBalancer())
    assert list(module.losses) == ["rgb", "normals", "norm_rgb"]
    assert type(module.losses["normals"]) is MaskedL1Loss and module.losses["normals"].scale_factor == 8
    batch = {
        **{
            k: v.unsqueeze(0).expand(2, -1, -1, -1)
            for k, v in (("rgb", item["rgb"]), ("normals", item["normals"]))
        }
    }
    batch["index"] = torch.tensor([0, 1])
    losses = module.sample_losses(batch, mask_seeds=torch.tensor([1, 2]))
    assert set(losses) == {"rgb", "normals", "norm_rgb"} and bool(
        torch.isfinite(losses["normals"].value).all()
    )
    assert module.score_batch(batch, seed=0, tasks=["normals"]).shape == (2,)

    # Config: accepted as data.modalities, counted as an output task, built by Hydra.
    cfg = compose_cfg("data.modalities=[rgb,normals]")
    validate_pretrain_config(cfg)
    assert output_tasks(list(cfg.data.modalities), norm_pix=True) == ["rgb", "normals", "norm_rgb"]
    built = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert list(built.net.input_adapters) == ["rgb", "normals"] and "normals" in built.losses


def test_a_registered_class_id_map_is_embedded_strided_and_scored_with_cross_entropy(parts: Modality) -> None:
    labels = np.random.default_rng(1).integers(0, 5, (32, 32), dtype=np.uint8)
    out = MultiModalTransform(input_size=32, train=False, semseg_stride=4)({"parts": labels})
    assert out["parts"].shape == (8, 8) and out["parts"].dtype == torch.int64
    assert torch.equal(
        out["parts"], torch.from_numpy(labels[2::4, 2::4]).long()
    )  # pixel centres of each cell
    assert to_tensors({"parts": labels})["parts"].shape == (32, 32)

    net = build_pretrain_multimae(
        size="micro",
        image_size=32,
        patch_size=8,
        in_domains=("rgb", "parts"),
        out_domains=("rgb", "parts"),
        semseg_num_classes=5,
        extra_norm_pix_loss=False,
        masking=MaskingConfig(num_encoded_tokens=8),
    )
    adapter = net.input_adapters["parts"]
    assert isinstance(adapter, SemSegInputAdapter) and adapter.stride_level == 4
    assert net.output_adapters["parts"].num_channels == 5 and net.output_adapters["parts"].stride_level == 4
    assert net.fp32_output_adapters == ("parts",)  # many-class logits decode in fp32, as semseg's
    with torch.no_grad():
        preds, _ = net({"parts": torch.randint(0, 5, (2, 8, 8))})  # image size: the class-id map x its stride
    assert preds["rgb"].shape == (2, 3, 32, 32) and preds["parts"].shape == (2, 5, 8, 8)
    module = MultiMAEPretrainModule(net=net, task_balancer=NoTaskBalancer())
    assert type(module.losses["parts"]) is MaskedCrossEntropyLoss and module.losses["parts"].scale_factor == 2
