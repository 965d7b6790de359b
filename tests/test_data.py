"""MultiModalFolder and the modality readers: pairing by stem, clear errors on bad files, item format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attent_vision.data.folder import MultiModalFolder
from attent_vision.data.modalities import DataFormatError, read_depth, read_rgb, read_semseg


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode == "P":
        image = image.convert("P")
    image.save(path)
    return path


def _write_sample(
    root: Path, cls: str, stem: str, sample_id: int, *, rgb_ext: str = "png", size=(6, 5)
) -> None:
    """One sample whose three modalities all encode `sample_id`, so a mispairing is visible."""
    h, w = size
    _save(root / "rgb" / cls / f"{stem}.{rgb_ext}", np.full((h, w, 3), (10 * sample_id, 7, 200), np.uint8))
    _save(root / "depth" / cls / f"{stem}.png", np.full((h, w), 1000 * sample_id + 1, np.uint16))
    _save(root / "semseg" / cls / f"{stem}.png", np.full((h, w), sample_id, np.uint8))


def _assert_consistent(item: dict[str, torch.Tensor]) -> int:
    sample_id = int(item["semseg"][0, 0])
    assert int(item["rgb"][0, 0, 0]) == 10 * sample_id
    assert round(float(item["depth"][0, 0, 0]) * 2**16) == 1000 * sample_id + 1
    return sample_id


def test_pairs_by_stem_where_sorted_position_would_misalign(tmp_path: Path) -> None:
    # rgb is BMP and depth/semseg PNG: sorted by file name, rgb lists "img.bmp" before "img.hires.bmp" while depth
    # lists "img.hires.png" before "img.png", so pairing by position (as the reference does) would swap them.
    _write_sample(tmp_path, "cat", "img", 1, rgb_ext="bmp")
    _write_sample(tmp_path, "cat", "img.hires", 2, rgb_ext="bmp")
    _write_sample(tmp_path, "dog", "001", 3)
    assert sorted(p.name for p in (tmp_path / "rgb" / "cat").iterdir()) == ["img.bmp", "img.hires.bmp"]
    assert sorted(p.name for p in (tmp_path / "depth" / "cat").iterdir()) == ["img.hires.png", "img.png"]

    dataset = MultiModalFolder(tmp_path)
    assert dataset.classes == ["cat", "dog"]
    assert dataset.samples == [("cat/img", 0), ("cat/img.hires", 0), ("dog/001", 1)]
    assert dataset.targets == [0, 0, 1]
    ids = [_assert_consistent(dataset[i]) for i in range(len(dataset))]
    assert ids == [1, 2, 3]


def test_missing_counterpart_names_the_file(tmp_path: Path) -> None:
    _write_sample(tmp_path, "cat", "000001", 1)
    _write_sample(tmp_path, "cat", "000002", 2)
    (tmp_path / "depth" / "cat" / "000001.png").unlink()
    with pytest.raises(
        DataFormatError, match=r"depth/cat/000001\.png is missing \(rgb has .*rgb/cat/000001\.png\)"
    ):
        MultiModalFolder(tmp_path)


def test_extra_file_in_one_modality_is_reported(tmp_path: Path) -> None:
    _write_sample(tmp_path, "cat", "a", 1)
    _save(tmp_path / "semseg" / "cat" / "b.png", np.zeros((6, 5), np.uint8))
    with pytest.raises(DataFormatError) as excinfo:
        MultiModalFolder(tmp_path)
    message = str(excinfo.value)
    assert "rgb/cat/b.png is missing (semseg has" in message
    assert "depth/cat/b.png is missing (semseg has" in message


def test_missing_modality_folder_empty_dataset_and_unknown_modality(tmp_path: Path) -> None:
    _write_sample(tmp_path, "cat", "a", 1)
    with pytest.raises(ValueError, match="unknown modality 'normal'"):
        MultiModalFolder(tmp_path, modalities=("rgb", "normal"))
    for modality in ("rgb", "depth"):
        (tmp_path / "empty" / modality / "cat").mkdir(parents=True)
    with pytest.raises(DataFormatError, match=r"empty/rgb has no image files"):
        MultiModalFolder(tmp_path / "empty", modalities=("rgb", "depth"))
    with pytest.raises(DataFormatError, match=r"empty/semseg is missing"):
        MultiModalFolder(tmp_path / "empty")


def test_items_carry_int64_index_and_label(tmp_path: Path) -> None:
    for i, cls in enumerate(["b", "a", "c", "a"]):
        _write_sample(tmp_path, cls, f"{i:03d}", i)
    dataset = MultiModalFolder(tmp_path)
    for position in range(len(dataset)):
        item = dataset[position]
        assert item["index"].dtype == torch.int64 and int(item["index"]) == position
        assert item["label"].dtype == torch.int64 and int(item["label"]) == dataset.targets[position]
        assert dataset.classes[int(item["label"])] == dataset.samples[position][0].split("/")[0]
        # No transform: raw tensors.
        assert item["rgb"].dtype == torch.uint8 and item["rgb"].shape == (3, 6, 5)
        assert item["depth"].dtype == torch.float32 and item["depth"].shape == (1, 6, 5)
        assert item["semseg"].dtype == torch.int64 and item["semseg"].shape == (6, 5)
    assert int(dataset[-1]["index"]) == len(dataset) - 1
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["label"].tolist() == dataset.targets


def test_modalities_of_different_sizes_name_files_and_sizes(tmp_path: Path) -> None:
    _write_sample(tmp_path, "cat", "a", 1)
    _save(tmp_path / "depth" / "cat" / "a.png", np.zeros((4, 4), np.uint16))
    dataset = MultiModalFolder(tmp_path)
    with pytest.raises(DataFormatError, match=r"rgb/cat/a\.png is 6x5.*depth/cat/a\.png is 4x4"):
        dataset[0]


def test_corrupt_png_names_the_file(tmp_path: Path) -> None:
    _write_sample(tmp_path, "cat", "a", 1)
    bad = tmp_path / "rgb" / "cat" / "a.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataFormatError, match=str(bad)):
        MultiModalFolder(tmp_path)[0]
    not_an_image = _save(tmp_path / "x.png", np.zeros((2, 2), np.uint8))
    not_an_image.write_bytes(b"definitely not an image")
    for reader in (read_rgb, read_depth, read_semseg):
        with pytest.raises(DataFormatError, match=str(not_an_image)):
            reader(not_an_image)


def test_depth_must_be_16_bit(tmp_path: Path) -> None:
    values = np.array([[0, 1, 65535], [300, 40000, 7]], np.uint16)
    good = _save(tmp_path / "d16.png", values)
    depth = read_depth(good)
    assert depth.dtype == np.uint16 and np.array_equal(depth, values)
    eight_bit = _save(tmp_path / "d8.png", values.astype(np.uint8))
    with pytest.raises(DataFormatError, match=rf"{eight_bit}.*16-bit.*'L'"):
        read_depth(eight_bit)
    with pytest.raises(DataFormatError, match="rgb must be an 8-bit"):
        read_rgb(good)


def test_semseg_reads_palette_indices_and_rejects_rgb(tmp_path: Path) -> None:
    labels = np.array([[0, 3, 3], [7, 255, 1]], np.uint8)
    assert np.array_equal(read_semseg(_save(tmp_path / "l.png", labels)), labels)
    palette_path = tmp_path / "p.png"
    palette = Image.new("P", (3, 2))
    palette.putdata(labels.ravel().tolist())
    palette.putpalette([(i * 37) % 256 for i in range(768)])  # colours unrelated to the ids
    palette.save(palette_path)
    assert Image.open(palette_path).mode == "P"
    assert np.array_equal(read_semseg(palette_path), labels)
    colour = _save(tmp_path / "rgb_labels.png", np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(DataFormatError, match=rf"{colour}.*'RGB'"):
        read_semseg(colour)
