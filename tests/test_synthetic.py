"""The procedural scene generator: layout, formats, determinism, caching and scene structure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attent_vision.data.folder import MultiModalFolder
from attent_vision.data.synthetic import (
    IMAGE_CLASSES,
    SEMSEG_CLASSES,
    ensure_synthetic_dataset,
    load_difficulty,
    main,
)

TINY = {"num_train": 16, "num_val": 4, "image_size": 32, "max_objects": 6, "seed": 0}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data", **TINY)


def test_layout_and_file_formats(tiny_root: Path) -> None:
    meta = json.loads((tiny_root / "meta.json").read_text())
    assert meta["params"] == TINY and meta["semseg_classes"] == list(SEMSEG_CLASSES)
    for split, count in (("train", 16), ("val", 4)):
        for modality in ("rgb", "depth", "semseg"):
            files = sorted((tiny_root / split / modality).glob("*/*.png"))
            assert len(files) == count
            assert {f.parent.name for f in files} <= set(IMAGE_CLASSES)
        assert sum(meta["counts"][split].values()) == count
    sample = next((tiny_root / "train" / "rgb").glob("*/*.png")).relative_to(tiny_root / "train" / "rgb")
    modes = {m: Image.open(tiny_root / "train" / m / sample).mode for m in ("rgb", "depth", "semseg")}
    assert modes == {"rgb": "RGB", "depth": "I;16", "semseg": "L"}
    assert Image.open(tiny_root / "train" / "rgb" / sample).size == (32, 32)


def test_loads_with_multimodal_folder(tiny_root: Path) -> None:
    train = MultiModalFolder(tiny_root / "train")
    val = MultiModalFolder(tiny_root / "val")
    # Every class folder exists in both splits, so class indices agree even if a class has no val image.
    assert train.classes == val.classes == list(IMAGE_CLASSES)
    assert len(train) == 16 and len(val) == 4
    item = train[3]
    assert item["semseg"].max() < len(SEMSEG_CLASSES)


def test_scene_structure(tiny_root: Path) -> None:
    difficulty = load_difficulty(tiny_root / "train")
    checked_columns = 0
    for semseg_path in sorted((tiny_root / "train" / "semseg").glob("*/*.png")):
        class_name, stem = semseg_path.parent.name, semseg_path.stem
        semseg = np.asarray(Image.open(semseg_path))
        depth = np.asarray(Image.open(tiny_root / "train" / "depth" / class_name / f"{stem}.png")).astype(
            np.int64
        )
        assert semseg.max() < len(SEMSEG_CLASSES)
        assert depth.min() > 0
        # The folder class is the object class covering the most pixels.
        object_ids = semseg[semseg >= 2]
        assert SEMSEG_CLASSES[np.bincount(object_ids).argmax()] == class_name
        assert difficulty[stem]["class"] == class_name
        # On the floor, depth grows towards the horizon: strictly larger on every higher floor pixel of a column.
        for column in range(semseg.shape[1]):
            rows = np.flatnonzero(semseg[:, column] == SEMSEG_CLASSES.index("floor"))
            if len(rows) >= 2:
                assert np.all(np.diff(depth[rows, column]) < 0), f"{stem} column {column}"
                checked_columns += 1
    assert checked_columns > 100


def test_difficulty_varies(tiny_root: Path) -> None:
    difficulty = load_difficulty(tiny_root / "train")
    assert sorted(difficulty) == [f"{i:06d}" for i in range(16)]
    counts = {entry["num_objects"] for entry in difficulty.values()}
    scores = np.array([entry["difficulty"] for entry in difficulty.values()])
    noise = np.array([entry["noise_std"] for entry in difficulty.values()])
    assert len(counts) >= 3
    assert np.all((scores >= 0) & (scores <= 1)) and scores.max() - scores.min() > 0.3
    assert noise.max() - noise.min() > 0.03
    # The scalar follows the factors: the more cluttered half of the scenes is harder on average.
    objects = np.array([entry["num_objects"] for entry in difficulty.values()])
    assert scores[objects > np.median(objects)].mean() > scores[objects <= np.median(objects)].mean()


def test_deterministic_and_independent_of_workers(tiny_root: Path, tmp_path: Path) -> None:
    again = ensure_synthetic_dataset(tmp_path / "again", **TINY, num_workers=2)
    assert _files(again) == _files(tiny_root)
    other_seed = ensure_synthetic_dataset(tmp_path / "other", **{**TINY, "seed": 1})
    reference = _files(tiny_root)
    differing = [name for name, data in _files(other_seed).items() if reference.get(name) != data]
    assert len(differing) > 20


def test_reuses_then_regenerates_on_change(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "cache"
    small = {**TINY, "num_train": 8, "num_val": 2}
    ensure_synthetic_dataset(root, **small)
    before = _mtimes(root)
    with caplog.at_level("INFO", logger="attent_vision.data.synthetic"):
        assert ensure_synthetic_dataset(root, **small) == root
    assert _mtimes(root) == before
    assert "Reusing" in caplog.text

    ensure_synthetic_dataset(root, **{**small, "num_train": 6})
    assert len(list((root / "train" / "rgb").glob("*/*.png"))) == 6
    assert json.loads((root / "meta.json").read_text())["params"]["num_train"] == 6
    assert not list((root / "train" / "rgb").glob("*/000007.png")), "old files must be deleted"

    # An interrupted generation (no meta.json, written last) is redone.
    (root / "meta.json").unlink()
    next((root / "val" / "depth").glob("*/*.png")).unlink()
    ensure_synthetic_dataset(root, **{**small, "num_train": 6})
    assert (root / "meta.json").exists()
    assert len(list((root / "val" / "depth").glob("*/*.png"))) == 2


def test_refuses_to_overwrite_foreign_data(tmp_path: Path) -> None:
    (tmp_path / "train" / "rgb").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="refusing"):
        ensure_synthetic_dataset(tmp_path, **TINY)
    assert (tmp_path / "train" / "rgb").is_dir()
    with pytest.raises(ValueError, match="max_objects"):
        ensure_synthetic_dataset(tmp_path / "new", **{**TINY, "max_objects": 7})


def test_cli_prints_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    main(["--out", str(out), "--num-train", "3", "--num-val", "1", "--image-size", "16"])
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "meta.json").read_text())["params"]["num_train"] == 3
