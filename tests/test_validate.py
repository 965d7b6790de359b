"""Up-front data validation: every problem listed at once, the size/mtime cache, clean DataLoader worker errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from attent_vision.data import validate as validate_module
from attent_vision.data.datamodule import MultiModalDataModule
from attent_vision.data.downstream import ClassificationDataModule, DenseDataModule, ImageFolderItems
from attent_vision.data.folder import MultiModalFolder
from attent_vision.data.modalities import DataFormatError
from attent_vision.data.synthetic import ensure_synthetic_dataset
from attent_vision.data.synthetic.downstream import ensure_nyu_like_scenes
from attent_vision.data.validate import FileChecks, clean_worker_error, validate_folder, validate_image_folder
from attent_vision.data.validation_cache import CACHE_NAME

FILES_PER_SPLIT = {"train": 12 * 3, "val": 4 * 3}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic_dataset(
        tmp_path_factory.mktemp("pristine"), num_train=12, num_val=4, image_size=40, max_objects=2
    )


@pytest.fixture
def data(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the valid synthetic set, free to break."""
    return Path(shutil.copytree(pristine, tmp_path / "data"))


def _files(root: Path, modality: str) -> list[Path]:
    return sorted((root / modality).rglob("*.png"))


def _rewrite(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def _break_everything(split: Path) -> dict[str, Path]:
    """One broken file per kind of problem, each in a different sample of the split."""
    rgb, depth, semseg = (_files(split, m) for m in ("rgb", "depth", "semseg"))
    broken = {
        "truncated": rgb[0],
        "depth8": depth[1],
        "semseg_rgb": semseg[2],
        "bad_ids": semseg[3],
        "mismatch": rgb[4],
        "tiny": rgb[5],
    }
    payload = rgb[0].read_bytes()
    rgb[0].write_bytes(payload[: len(payload) // 2])
    _rewrite(depth[1], (np.asarray(Image.open(depth[1])) >> 8).astype(np.uint8))  # 8-bit "L": precision lost
    _rewrite(semseg[2], np.stack([np.asarray(Image.open(semseg[2]))] * 3, axis=-1))
    ids = np.asarray(Image.open(semseg[3])).copy()
    ids[0, :3] = (9, 12, 255)  # 255 is the ignore index: allowed
    _rewrite(semseg[3], ids)
    _rewrite(rgb[4], np.asarray(Image.open(rgb[4]))[:, :32])
    for files in (rgb, depth, semseg):  # a whole sample smaller than one 8x8 patch
        _rewrite(files[5], np.asarray(Image.open(files[5]))[:5, :7])
    return broken


def test_valid_set_passes_and_second_check_reads_nothing(data: Path) -> None:
    dataset = MultiModalFolder(data / "train")
    first = validate_folder(dataset, min_size=8, num_classes=8)
    assert first.problems == [] and first.checked == first.files == FILES_PER_SPLIT["train"]
    assert (data / "train" / CACHE_NAME).is_file()
    first.raise_if_problems()

    second = validate_folder(dataset, min_size=8, num_classes=8)
    assert (second.checked, second.cached, second.problems) == (0, FILES_PER_SPLIT["train"], [])
    assert second.seconds < 1.0


def test_every_problem_is_listed_in_one_error(data: Path) -> None:
    broken = _break_everything(data / "train")
    module = MultiModalDataModule(root=str(data), num_classes=8)
    with pytest.raises(DataFormatError) as info:
        module.validate_files(min_size=8, workers=0)
    message = str(info.value)
    lines = {line.strip() for line in message.splitlines()}

    def line_of(path: Path, phrase: str) -> str:
        found = [line for line in lines if line.startswith(f"{path}: ") and phrase in line]
        assert found, f"no line for {path} mentioning {phrase!r} in:\n{message}"
        return found[0]

    line_of(broken["truncated"], "cannot decode image")
    line_of(broken["depth8"], "16-bit")
    line_of(broken["semseg_rgb"], "got mode 'RGB'")
    ids_line = line_of(broken["bad_ids"], "semseg ids [9, 12]")
    assert "255" in ids_line.split("expected")[1]  # named as allowed, not as offending
    mismatch = line_of(broken["mismatch"], "differ in size")
    assert "40x32" in mismatch and "40x40" in mismatch
    tiny = sorted(
        (data / "train").glob(f"*/{broken['tiny'].relative_to(data / 'train' / 'rgb').with_suffix('')}.*")
    )
    assert len(tiny) == 3
    for path in tiny:
        line_of(path, "5x7 pixels is smaller than one 8x8 patch")
    assert "8 problem(s)" in message and str(data / "train") in message and str(data / "val") in message
    assert "training did not start" in message and message.rstrip().endswith("new or changed files.")


def test_parallel_check_lists_the_same_problems(data: Path, tmp_path: Path) -> None:
    _break_everything(data / "train")
    dataset = MultiModalFolder(data / "train")
    sequential = validate_folder(dataset, min_size=8, num_classes=8, workers=0, cache_dir=tmp_path / "a")
    parallel = validate_folder(dataset, min_size=8, num_classes=8, workers=2, cache_dir=tmp_path / "b")
    assert len(sequential.problems) == 8
    assert parallel.problems == sequential.problems
    # Failing files are never cached: the next check reads the 7 that failed their own checks again (rgb[4] of
    # the size mismatch passed them, so its cached size is reused) and reports the same problems.
    again = validate_folder(dataset, min_size=8, num_classes=8, workers=2, cache_dir=tmp_path / "b")
    assert again.problems == sequential.problems and again.checked == 7
    assert not (data / "train" / CACHE_NAME).exists()  # cache_dir was honoured


def test_changed_file_is_rechecked_alone(data: Path) -> None:
    dataset = MultiModalFolder(data / "train")
    validate_folder(dataset, min_size=8, num_classes=8)
    depth = _files(data / "train", "depth")

    stat = depth[0].stat()
    os.utime(depth[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touch
    report = validate_folder(dataset, min_size=8, num_classes=8)
    assert (report.checked, report.cached, report.problems) == (1, FILES_PER_SPLIT["train"] - 1, [])

    # Rewritten with other content: re-read, and the sample's size check still uses the cached sizes of the others.
    _rewrite(depth[2], np.asarray(Image.open(depth[2]))[:, :30])
    report = validate_folder(dataset, min_size=8, num_classes=8)
    assert report.checked == 1 and len(report.problems) == 1 and "differ in size" in report.problems[0]


def test_changed_check_parameters_recheck_everything(data: Path) -> None:
    dataset = MultiModalFolder(data / "train")
    validate_folder(dataset, min_size=8, num_classes=8)
    report = validate_folder(dataset, min_size=8, num_classes=6)
    assert report.checked == FILES_PER_SPLIT["train"]
    # The old parameters keep their own section: switching back is instant again.
    assert validate_folder(dataset, min_size=8, num_classes=8).checked == 0


def test_corrupt_cache_is_ignored(data: Path) -> None:
    dataset = MultiModalFolder(data / "val")
    validate_folder(dataset, min_size=8, num_classes=8)
    cache = data / "val" / CACHE_NAME
    key = FileChecks(min_size=8, num_classes=8).key()
    for garbage in ("{not json", "[1, 2]", json.dumps({"version": 1, "sections": {key: 3}})):
        cache.write_text(garbage)
        report = validate_folder(dataset, min_size=8, num_classes=8)
        assert (report.checked, report.problems) == (FILES_PER_SPLIT["val"], [])
        assert json.loads(cache.read_text())["version"] == 1
    assert validate_folder(dataset, min_size=8, num_classes=8).checked == 0


def test_read_only_split_caches_in_the_user_cache(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(validate_module.os, "access", lambda path, mode: False)
    dataset = MultiModalFolder(data / "val")
    assert validate_folder(dataset).checked == FILES_PER_SPLIT["val"]
    assert not (data / "val" / CACHE_NAME).exists()
    assert [
        p.name.startswith("val-") for p in (tmp_path / "xdg" / "attent_vision" / "validated").iterdir()
    ] == [True]
    assert validate_folder(dataset).checked == 0


def test_dense_label_ids_follow_reduce_zero_label(tmp_path: Path) -> None:
    root = ensure_nyu_like_scenes(tmp_path / "nyu", num_train=3, num_eval=2, image_size=24)
    labels = sorted((root / "train" / "semseg" / "data").glob("*.png"))
    for path, value in zip(labels, (40, 41, 255), strict=True):  # 40 = the last class; 255 = ignored
        ids = np.asarray(Image.open(path)).copy()
        ids[0, 0] = value
        _rewrite(path, ids)
    module = DenseDataModule(root=str(root), inputs=("rgb", "depth"), num_classes=40)
    with pytest.raises(DataFormatError) as info:
        module.validate_files(min_size=8)
    assert "1 problem(s)" in str(info.value)
    assert f"{labels[1]}: semseg ids [41]" in str(info.value) and "expected 0..40" in str(info.value)

    depth_target = DenseDataModule(root=str(root), target="depth", num_classes=40)
    depth_target.validate_files(min_size=8)  # labels are not read for a depth target


def test_image_folder_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            _rewrite(tmp_path / split / cls / "ok.png", good)
    corrupt_jpeg = tmp_path / "train" / "cat" / "corrupt.jpg"
    corrupt_jpeg.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    sixteen_bit = tmp_path / "train" / "dog" / "depth.png"
    _rewrite(sixteen_bit, np.full((20, 20), 1000, np.uint16))
    tiny = tmp_path / "val" / "dog" / "tiny.png"
    _rewrite(tiny, good[:4, :4])

    report = validate_image_folder(ImageFolderItems(tmp_path / "train"), min_size=8, workers=2)
    assert report.files == 4 and len(report.problems) == 2
    assert report.problems[0].startswith(f"{corrupt_jpeg}: cannot decode image")
    assert report.problems[1].startswith(f"{sixteen_bit}: rgb must be an 8-bit colour image")

    module = ClassificationDataModule(root=str(tmp_path), num_classes=2, auto_augment=None)
    with pytest.raises(DataFormatError) as info:
        module.validate_files(min_size=8)
    assert "3 problem(s)" in str(info.value) and f"{tiny}: 4x4 pixels is smaller than one 8x8 patch" in str(
        info.value
    )
    assert (
        validate_image_folder(ImageFolderItems(tmp_path / "train"), min_size=8).checked == 2
    )  # the bad ones


def test_clean_worker_error_names_the_file(data: Path) -> None:
    victim = _files(data / "val", "depth")[1]
    _rewrite(victim, np.zeros((40, 40), np.uint8))
    loader = DataLoader(MultiModalFolder(data / "val"), batch_size=4, num_workers=1)
    with pytest.raises(DataFormatError) as info:
        next(iter(loader))
    raw = str(info.value)
    assert "DataLoader worker process 0" in raw and "Traceback" in raw  # what PyTorch shows by default
    cleaned = clean_worker_error(info.value)
    assert cleaned.startswith(f"{victim}: depth must be a 16-bit single-channel image")
    assert "\n" not in cleaned and "Traceback" not in cleaned

    assert clean_worker_error(ValueError("plain message")) == "plain message"
    multi = DataFormatError(
        "Caught DataFormatError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise DataFormatError(msg)\n'
        "attent_vision.data.modalities.DataFormatError: /d/a.png: first line\nsecond line\n"
    )
    assert clean_worker_error(multi) == "/d/a.png: first line\nsecond line"
