"""MultiModalTransform: modalities stay aligned through crop and flip; eval is deterministic; formats and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attent_vision.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from attent_vision.data.transforms import MultiModalTransform

GRID, BLOCK, SIZE = 8, 16, 64  # an 8×8 grid of 16-px blocks (128×128 input), cropped to 64×64


def _block_sample() -> dict:
    """Block k (row-major) has rgb (4k, 255-4k, 16k mod 256), raw depth 1000(k+1) and label k."""
    k = np.arange(GRID * GRID).reshape(GRID, GRID).repeat(BLOCK, 0).repeat(BLOCK, 1)
    rgb = np.stack([4 * k, 255 - 4 * k, (16 * k) % 256], axis=-1).astype(np.uint8)
    return {
        "rgb": Image.fromarray(rgb),
        "depth": (1000 * (k + 1)).astype(np.uint16),
        "semseg": k.astype(np.uint8),
    }


def _decode(out: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block ids seen by each modality: rgb and depth per pixel (float), semseg per label cell."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    rgb = ((out["rgb"] * std + mean) * 255.0).numpy()
    depth = (out["depth"][0] * 2**16 / 1000.0 - 1.0).numpy()
    return rgb, depth, out["semseg"].numpy()


def _interior(ids: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose (2 radius + 1)² neighbourhood shows a single block (away from block borders)."""
    padded = np.pad(ids, radius, mode="edge")
    same = np.ones_like(ids, dtype=bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy : dy + ids.shape[0], dx : dx + ids.shape[1]] == ids
    return same


def _check_aligned(out: dict[str, torch.Tensor], stride: int) -> int:
    rgb, depth, semseg = _decode(out)
    k = np.rint(depth).astype(int)
    inside = _interior(k, 2) & (np.abs(depth - k) < 1e-3)
    assert inside.sum() > 200, "too few interior pixels: the test would check nothing"
    # rgb encodes the same block k at every interior pixel (tolerance: bicubic rounding).
    assert np.abs(rgb[0][inside] - 4 * k[inside]).max() < 2.5
    assert np.abs(rgb[1][inside] - (255 - 4 * k[inside])).max() < 2.5
    assert np.abs(rgb[2][inside] - (16 * k[inside]) % 256).max() < 2.5
    # Each label cell is sampled at the centre of its stride×stride cell of the full-resolution crop.
    centres = np.arange(semseg.shape[0]) * stride + stride // 2
    k_at_centres = k[np.ix_(centres, centres)]
    checked = inside[np.ix_(centres, centres)]
    assert checked.sum() > 20
    assert np.array_equal(semseg[checked], k_at_centres[checked])
    return int(inside.sum())


def test_train_transform_keeps_modalities_aligned_and_flips_them_together() -> None:
    sample = _block_sample()
    flip_transform = MultiModalTransform(input_size=SIZE, train=True, hflip=0.5)
    no_flip_transform = MultiModalTransform(input_size=SIZE, train=True, hflip=0.0)
    flipped_seeds = unflipped_seeds = 0
    crops = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = flip_transform(sample)
        torch.manual_seed(seed)
        reference = no_flip_transform(sample)  # same crop box (drawn first), never flipped
        assert out["rgb"].shape == (3, SIZE, SIZE) and out["rgb"].dtype == torch.float32
        assert out["depth"].shape == (1, SIZE, SIZE) and out["depth"].dtype == torch.float32
        assert out["semseg"].shape == (SIZE // 4, SIZE // 4) and out["semseg"].dtype == torch.int64
        _check_aligned(out, stride=4)
        crops.add(tuple(np.round(reference["depth"][0, ::16, ::16].numpy() * 2**16).ravel()))
        same = all(torch.equal(out[m], reference[m]) for m in ("rgb", "depth", "semseg"))
        mirrored = all(torch.equal(out[m], reference[m].flip(-1)) for m in ("rgb", "depth", "semseg"))
        assert same != mirrored, "every modality must take the same flip decision"
        flipped_seeds += mirrored
        unflipped_seeds += same
    assert flipped_seeds >= 2 and unflipped_seeds >= 2
    assert len(crops) >= 10, "crop boxes should differ across seeds"


def test_semseg_keeps_only_input_label_values() -> None:
    labels = np.random.default_rng(0).choice(np.array([3, 200, 255], np.uint8), size=(50, 70))
    torch.manual_seed(0)
    for train in (True, False):
        out = MultiModalTransform(input_size=32, train=train, semseg_stride=2)({"semseg": labels})
        assert out["semseg"].shape == (16, 16)
        assert set(out["semseg"].unique().tolist()) <= {3, 200, 255}


def test_eval_transform_is_deterministic_centre_crop() -> None:
    # Depth encodes the column index: eval keeps the central 64×64 square of a 64×96 image and halves it.
    columns = np.tile(np.arange(96, dtype=np.uint16) * 100, (64, 1))
    rgb = np.zeros((64, 96, 3), np.uint8)
    sample = {"rgb": rgb, "depth": columns, "semseg": (columns // 100).astype(np.uint8)}
    transform = MultiModalTransform(input_size=32, train=False)
    torch.manual_seed(0)
    first = transform(sample)
    torch.manual_seed(1)
    second = transform(sample)
    for name in first:
        assert torch.equal(first[name], second[name])
    raw = first["depth"][0, 0].numpy() * 2**16
    expected = (16 + 2 * np.arange(32) + 0.5) * 100  # output column j averages input columns 16 + 2j, 17 + 2j
    np.testing.assert_allclose(raw[1:-1], expected[1:-1], atol=1.0)  # edge columns see only one side
    assert first["semseg"].shape == (8, 8)
    # Labels: nearest from the 32×32 crop (input column 16 + 2i + 1), then cell a takes crop column 4a + 2.
    assert first["semseg"][0].tolist() == [21 + 8 * a for a in range(8)]


def test_eval_on_input_size_images_is_identity() -> None:
    depth = np.random.default_rng(1).integers(0, 65535, size=(32, 32)).astype(np.uint16)
    out = MultiModalTransform(input_size=32, train=False)({"depth": depth})
    assert torch.equal(out["depth"][0], torch.from_numpy(depth.astype(np.float32)) / 2**16)


def test_rgb_is_imagenet_normalised() -> None:
    rgb = np.full((8, 8, 3), (255, 0, 128), np.uint8)
    out = MultiModalTransform(input_size=8, train=False)({"rgb": rgb})["rgb"]
    expected = (torch.tensor([255, 0, 128]) / 255.0 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(
        IMAGENET_DEFAULT_STD
    )
    torch.testing.assert_close(out[:, 0, 0], expected)


def test_invalid_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        MultiModalTransform(input_size=30, semseg_stride=4)
    with pytest.raises(ValueError, match="hflip"):
        MultiModalTransform(input_size=32, hflip=1.5)
    transform = MultiModalTransform(input_size=16)
    with pytest.raises(ValueError, match="differ in size"):
        transform({"rgb": np.zeros((16, 16, 3), np.uint8), "depth": np.zeros((16, 20), np.uint16)})
    with pytest.raises(ValueError, match="normal"):
        transform({"normal": np.zeros((16, 16, 3), np.uint8)})


def test_depth_resampling_does_not_overshoot_at_discontinuities() -> None:
    # A near object (raw 1000) against a far wall (raw 60000), enlarged 4×: bicubic would ring past both values.
    depth = np.full((8, 8), 60000, np.uint16)
    depth[:, :4] = 1000
    out = MultiModalTransform(input_size=32, train=False)({"depth": depth})["depth"] * 2**16
    assert out.min() >= 1000 - 1e-3 and out.max() <= 60000 + 1e-3
    assert len(out.unique()) > 2  # interpolated, not nearest


def test_the_written_out_imagenet_statistics_are_timms() -> None:
    import timm.data

    assert IMAGENET_DEFAULT_MEAN == timm.data.IMAGENET_DEFAULT_MEAN
    assert IMAGENET_DEFAULT_STD == timm.data.IMAGENET_DEFAULT_STD
