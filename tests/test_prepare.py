"""Dataset preparation: tiny inputs in the exact official structures, converted through the functions and the CLI.

Each prepare call prints its elapsed time (`pytest -s` shows the "[timing]" lines).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from attent_vision.data.folder import MultiModalFolder
from attent_vision.data.modalities import DataFormatError
from attent_vision.data.prepare import encode_nyu_depth, main, prepare_imagenet_s50, prepare_nyuv2

ROOT = Path(__file__).resolve().parents[1]

# Tiny NYUv2: N images of H x W pixels (the real file has 1449 of 480 x 640).
N, H, W = 6, 8, 10
NUM_ORIGINAL = 5  # original class ids 1..5 (894 in the real mapping)
CLASS_NAMES = [f"class{k:02d}" for k in range(1, 41)]
MAP_CLASS = np.array([3, 1, 40, 2, 7], dtype=np.float64)  # original id k -> MAP_CLASS[k - 1]
TRAIN_1BASED = [1, 3, 4, 6]
TEST_1BASED = [2, 5]


def _timed(label: str, call: Callable[[], Any]) -> Any:
    """Runs `call` and prints its wall time, for the preparation timings report."""
    start = time.perf_counter()
    try:
        return call()
    finally:  # also when the call raises, as the failing-input cases do
        print(f"\n[timing] {label}: {time.perf_counter() - start:.3f} s")


def _run_cli(label: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Runs `python -m attent_vision.data.prepare ARGS` in a fresh interpreter."""
    command = [sys.executable, "-m", "attent_vision.data.prepare", *map(str, args)]
    return _timed(
        label, lambda: subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    )


# ---------------------------------------------------------------------------------------------------------- NYUv2


def _write_matlab73(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes HDF5 datasets behind a 512-byte user block holding a MATLAB 7.3 header, as MATLAB's `save -v7.3`."""
    with h5py.File(path, "w", userblock_size=512) as h5:
        for key, value in arrays.items():
            h5.create_dataset(key, data=value)
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b" " * 8 + b"\x00\x02" + b"IM"
    with path.open("r+b") as handle:
        handle.write(header)


@pytest.fixture
def nyu_source() -> dict[str, np.ndarray]:
    """Images, depths (metres) and original labels in natural (N, H, W[, 3]) order, with edge-case depths."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(N, H, W, 3), dtype=np.uint8)
    depths = rng.uniform(0.3, 9.9, size=(N, H, W))
    depths[0, 0, 0] = 10.0  # the reference wrapped this to 0
    depths[0, 0, 1] = np.nan
    depths[0, 1, 0] = -1.0
    depths[0, 1, 1] = 12.5
    depths[0, 2, 3] = 0.0
    labels = rng.integers(0, NUM_ORIGINAL + 1, size=(N, H, W)).astype(np.uint16)
    labels[:, 0, :] = 0  # a row of unlabeled pixels in every image
    return {"images": images, "depths": depths, "labels": labels}


def _nyu_files(
    tmp_path: Path,
    source: dict[str, np.ndarray],
    *,
    h5_arrays: dict[str, np.ndarray] | None = None,
    splits: dict[str, Any] | None = None,
    mapping: dict[str, Any] | None = None,
) -> tuple[Path, Path, Path]:
    """Writes nyu_depth_v2_labeled.mat / splits.mat / classMapping40.mat; keyword overrides build broken ones."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    labeled, splits_path, mapping_path = (
        src / "nyu_depth_v2_labeled.mat",
        src / "splits.mat",
        src / "classMapping40.mat",
    )
    if h5_arrays is None:
        # h5py shows MATLAB's column-major H x W x 3 x N array as (N, 3, W, H).
        h5_arrays = {
            "images": source["images"].transpose(0, 3, 2, 1),
            "depths": source["depths"].transpose(0, 2, 1),
            "labels": source["labels"].transpose(0, 2, 1),
        }
    _write_matlab73(labeled, h5_arrays)
    if splits is None:
        splits = {
            "trainNdxs": np.array(TRAIN_1BASED, dtype=np.float64).reshape(-1, 1),
            "testNdxs": np.array(TEST_1BASED, dtype=np.float64).reshape(-1, 1),
        }
    scipy.io.savemat(splits_path, splits)
    if mapping is None:
        mapping = {
            "mapClass": MAP_CLASS.reshape(1, -1),
            "className": np.array(CLASS_NAMES, dtype=object).reshape(1, -1),
        }
    scipy.io.savemat(mapping_path, mapping)
    return labeled, splits_path, mapping_path


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _assert_nyu_output(out: Path, source: dict[str, np.ndarray]) -> None:
    expected = ["meta.json"]
    for split, ones_based in (("train", TRAIN_1BASED), ("test", TEST_1BASED)):
        for modality in ("rgb", "depth", "semseg"):
            expected += [f"{split}/{modality}/data/{i - 1:04d}.png" for i in ones_based]
    assert _tree(out) == sorted(expected)

    lut = np.concatenate([[0], MAP_CLASS]).astype(np.uint8)
    for split, ones_based in (("train", TRAIN_1BASED), ("test", TEST_1BASED)):
        for index in (i - 1 for i in ones_based):
            name = f"{index:04d}.png"
            rgb = Image.open(out / split / "rgb" / "data" / name)
            assert rgb.mode == "RGB" and rgb.size == (W, H)
            np.testing.assert_array_equal(np.array(rgb), source["images"][index])
            depth = Image.open(out / split / "depth" / "data" / name)
            assert depth.mode == "I;16"
            expected_depth = np.nan_to_num(np.rint(source["depths"][index] * 6553.6), nan=0.0).clip(0, 65535)
            np.testing.assert_array_equal(np.array(depth), expected_depth.astype(np.uint16))
            semseg = Image.open(out / split / "semseg" / "data" / name)
            assert semseg.mode == "P"
            np.testing.assert_array_equal(np.array(semseg), lut[source["labels"][index]])
            assert (np.array(semseg)[0] == 0).all()  # unlabeled stays 0
    depth0 = np.array(Image.open(out / "train" / "depth" / "data" / "0000.png"))
    assert depth0[0, 0] == 65535 and depth0[0, 1] == 0 and depth0[1, 0] == 0 and depth0[1, 1] == 65535
    assert depth0[2, 3] == 0

    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"] == {"train": len(TRAIN_1BASED), "test": len(TEST_1BASED)}
    assert meta["num_images"] == N and meta["image_size_hw"] == [H, W]
    assert meta["semseg"]["class_names"] == CLASS_NAMES
    assert meta["depth"]["units_per_metre"] == pytest.approx(6553.6)
    assert Path(meta["source"]["labeled"]).name == "nyu_depth_v2_labeled.mat"


def test_encode_nyu_depth_clips_instead_of_wrapping() -> None:
    metres = np.array([0.0, 1.0, 9.99999, 10.0, 11.0, np.nan, -2.0, np.inf])
    np.testing.assert_array_equal(encode_nyu_depth(metres), [0, 6554, 65535, 65535, 65535, 0, 0, 0])


def test_nyuv2_function_round_trips_pixels(tmp_path: Path, nyu_source: dict[str, np.ndarray]) -> None:
    labeled, splits, mapping = _nyu_files(tmp_path, nyu_source)
    with h5py.File(labeled, "r") as h5:  # the fixture really is laid out as MATLAB v7.3 files are
        assert h5.userblock_size == 512 and h5["images"].shape == (N, 3, W, H)
    assert labeled.read_bytes().startswith(b"MATLAB 7.3 MAT-file")
    out = tmp_path / "nyu"
    summary = _timed(
        f"prepare_nyuv2 function, {N} images {H}x{W}",
        lambda: prepare_nyuv2(labeled, splits, mapping, out, progress=False),
    )
    assert summary["counts"] == {"train": 4, "test": 2} and summary["elapsed_s"] >= 0
    _assert_nyu_output(out, nyu_source)

    dataset = MultiModalFolder(out / "train", modalities=("rgb", "depth", "semseg"))
    assert dataset.classes == ["data"] and len(dataset) == len(TRAIN_1BASED)
    assert [key for key, _ in dataset.samples] == [f"data/{i - 1:04d}" for i in TRAIN_1BASED]
    item = dataset[1]  # dataset index 2
    assert (
        item["rgb"].shape == (3, H, W) and item["depth"].shape == (1, H, W) and item["semseg"].shape == (H, W)
    )
    np.testing.assert_array_equal(item["rgb"].permute(1, 2, 0).numpy(), nyu_source["images"][2])

    # A second run refuses to mix with the first, unless asked to replace it.
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_nyuv2(labeled, splits, mapping, out, progress=False)
    prepare_nyuv2(labeled, splits, mapping, out, overwrite=True, progress=False)
    _assert_nyu_output(out, nyu_source)


def test_nyuv2_cli_with_workers_matches_function(tmp_path: Path, nyu_source: dict[str, np.ndarray]) -> None:
    labeled, splits, mapping = _nyu_files(tmp_path, nyu_source)
    out = tmp_path / "nyu_cli"
    result = _run_cli(
        f"prepare nyuv2 CLI subprocess --workers 2, {N} images {H}x{W} (incl. interpreter start)",
        "nyuv2",
        "--labeled",
        labeled,
        "--splits",
        splits,
        "--mapping",
        mapping,
        "--out",
        out,
        "--workers",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert "train 4, test 2" in result.stdout
    _assert_nyu_output(out, nyu_source)


def _bad_nyu_case(
    name: str, tmp_path: Path, source: dict[str, np.ndarray]
) -> tuple[Path, Path, Path, Path, str]:
    """Builds one broken input; returns (labeled, splits, mapping, the file the error must name, a message regex)."""
    good = {
        "images": source["images"].transpose(0, 3, 2, 1),
        "depths": source["depths"].transpose(0, 2, 1),
        "labels": source["labels"].transpose(0, 2, 1),
    }
    col = lambda values: np.array(values, dtype=np.float64).reshape(-1, 1)  # noqa: E731
    if name == "missing_labeled":
        files = _nyu_files(tmp_path, source)
        files[0].unlink()
        return (*files, files[0], "not found")
    if name == "labeled_not_hdf5":
        files = _nyu_files(tmp_path, source)
        files[0].write_bytes(b"this is not a MAT-file at all" * 20)
        return (*files, files[0], "not an HDF5 file")
    if name == "labeled_is_v5":
        files = _nyu_files(tmp_path, source)
        scipy.io.savemat(files[0], {"images": source["images"]})
        return (*files, files[0], "MATLAB v5")
    if name == "missing_key":
        files = _nyu_files(tmp_path, source, h5_arrays={k: v for k, v in good.items() if k != "labels"})
        return (*files, files[0], r"missing dataset 'labels'; the file holds \['depths', 'images'\]")
    if name == "wrong_shape":
        files = _nyu_files(tmp_path, source, h5_arrays={**good, "images": source["images"]})  # (N, H, W, 3)
        return (*files, files[0], r"images has shape \(6, 8, 10, 3\).*expected \(N, 3, W, H\)")
    if name == "depth_shape_mismatch":
        files = _nyu_files(tmp_path, source, h5_arrays={**good, "depths": source["depths"]})  # not transposed
        return (*files, files[0], r"depths has shape \(6, 8, 10\)")
    if name == "index_out_of_range":
        files = _nyu_files(tmp_path, source, splits={"trainNdxs": col([1, 3, 1450]), "testNdxs": col([2])})
        return (*files, files[1], r"trainNdxs holds index 1450 .*outside \[1, 6\]")
    if name == "index_zero":
        files = _nyu_files(tmp_path, source, splits={"trainNdxs": col([1]), "testNdxs": col([0, 2])})
        return (*files, files[1], r"testNdxs holds index 0 ")
    if name == "split_key_missing":
        files = _nyu_files(tmp_path, source, splits={"trainNdxs": col([1]), "testIdx": col([2])})
        return (*files, files[1], r"missing variable 'testNdxs'; the file holds \['testIdx', 'trainNdxs'\]")
    if name == "splits_overlap":
        files = _nyu_files(tmp_path, source, splits={"trainNdxs": col([1, 2, 3]), "testNdxs": col([3, 4])})
        return (*files, files[1], "in both trainNdxs and testNdxs, e.g. index 3")
    if name == "splits_not_mat":
        files = _nyu_files(tmp_path, source)
        files[1].write_text("trainNdxs = 1:795\n")
        return (*files, files[1], "not a readable MATLAB .mat file")
    names = np.array(CLASS_NAMES, dtype=object).reshape(1, -1)
    if name == "mapping_too_short":
        short = {"mapClass": MAP_CLASS[:3].reshape(1, -1), "className": names}
        files = _nyu_files(tmp_path, source, mapping=short)
        return (*files, files[2], r"original class id 5, but mapClass in .* has only 3 entries")
    if name == "mapping_id_out_of_range":
        wild = {"mapClass": np.array([[3, 1, 41, 2, 7]], np.float64), "className": names}
        files = _nyu_files(tmp_path, source, mapping=wild)
        return (*files, files[2], r"mapClass maps to class id 41, outside \[0, 40\]")
    if name == "mapping_key_missing":
        files = _nyu_files(tmp_path, source, mapping={"mapClass": MAP_CLASS.reshape(1, -1)})
        return (*files, files[2], r"missing variable 'className'")
    raise AssertionError(name)


BAD_NYU_CASES = [
    "missing_labeled",
    "labeled_not_hdf5",
    "labeled_is_v5",
    "missing_key",
    "wrong_shape",
    "depth_shape_mismatch",
    "index_out_of_range",
    "index_zero",
    "split_key_missing",
    "splits_overlap",
    "splits_not_mat",
    "mapping_too_short",
    "mapping_id_out_of_range",
    "mapping_key_missing",
]


@pytest.mark.parametrize("case", BAD_NYU_CASES)
def test_nyuv2_bad_inputs_name_the_file(case: str, tmp_path: Path, nyu_source: dict[str, np.ndarray]) -> None:
    labeled, splits, mapping, culprit, pattern = _bad_nyu_case(case, tmp_path, nyu_source)
    out = tmp_path / "out"
    with pytest.raises(DataFormatError, match=pattern) as info:
        prepare_nyuv2(labeled, splits, mapping, out, progress=False)
    assert str(culprit) in str(info.value)
    assert not out.exists()  # validated before anything is written


def test_nyuv2_cli_reports_errors_without_traceback(
    tmp_path: Path, nyu_source: dict[str, np.ndarray]
) -> None:
    labeled, splits, mapping, culprit, _ = _bad_nyu_case("index_out_of_range", tmp_path, nyu_source)
    args = ["nyuv2", "--labeled", labeled, "--splits", splits, "--mapping", mapping, "--out", tmp_path / "o"]
    result = _run_cli("prepare nyuv2 CLI subprocess, failing validation (incl. interpreter start)", *args)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and str(culprit) in result.stderr and "1450" in result.stderr
    assert "Traceback" not in result.stderr


def test_nyuv2_main_in_process_reports_errors(
    tmp_path: Path, nyu_source: dict[str, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    labeled, splits, mapping, _, _ = _bad_nyu_case("labeled_not_hdf5", tmp_path, nyu_source)
    args = ["nyuv2", "--labeled", labeled, "--splits", splits, "--mapping", mapping, "--out", tmp_path / "o"]
    assert main([str(a) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {labeled}: is not an HDF5 file") and "Traceback" not in err


# --------------------------------------------------------------------------------------------------- ImageNet-S50

IMG_H, IMG_W = 10, 12
# (class, stem, sample id, has depth, has semseg)
S50_SAMPLES = [
    ("n01443537", "n01443537_1", 1, True, True),
    ("n01443537", "n01443537_2", 2, True, False),  # lacks semseg
    ("n01443537", "n01443537_3", 3, True, True),
    ("n01491361", "n01491361_4", 4, False, True),  # lacks depth
    ("n01491361", "n01491361_5", 5, True, True),
    ("n01491361", "n01491361_6", 6, True, True),  # 8-bit depth: bad
]
BAD_STEM = "n01491361_6"


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def s50_source(tmp_path: Path) -> dict[str, Path]:
    """ImageNet-S50 JPEG tree plus pseudo labels; every modality encodes the sample id so mispairing shows."""
    roots = {name: tmp_path / "s50" / name for name in ("images", "depth", "semseg")}
    for cls, stem, sample_id, has_depth, has_semseg in S50_SAMPLES:
        path = roots["images"] / cls / f"{stem}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((IMG_H, IMG_W, 3), (30 * sample_id, 128, 64), np.uint8)).save(
            path, "JPEG", quality=95
        )
        if has_depth:
            depth = np.full((IMG_H, IMG_W), 1000 * sample_id, np.uint16)
            if stem == BAD_STEM:  # an 8-bit depth map ("L"), as a careless export would write
                depth = (depth // 256).astype(np.uint8)
            _write_png(roots["depth"] / cls / f"{stem}.png", depth)
        if has_semseg:
            _write_png(roots["semseg"] / cls / f"{stem}.png", np.full((IMG_H, IMG_W), sample_id, np.uint8))
    # Labels without an image: a stray stem in a known class, and a class the image folder lacks.
    _write_png(roots["depth"] / "n01491361" / "n01491361_99.png", np.zeros((IMG_H, IMG_W), np.uint16))
    _write_png(roots["semseg"] / "n09999999" / "n09999999_1.png", np.zeros((IMG_H, IMG_W), np.uint8))
    (roots["images"] / "n01443537" / "notes.txt").write_text("not an image")
    return roots


EXPECTED_WRITTEN = ["n01443537/n01443537_1", "n01443537/n01443537_3", "n01491361/n01491361_5"]


def _assert_s50_output(split_dir: Path) -> None:
    expected = ["missing_labels.txt", "prepare_report.json"]
    for key in EXPECTED_WRITTEN:
        expected += [f"rgb/{key}.JPEG", f"depth/{key}.png", f"semseg/{key}.png"]
    assert _tree(split_dir) == sorted(expected)
    assert (split_dir / "missing_labels.txt").read_text() == (
        "n01443537/n01443537_2.JPEG\tsemseg\nn01491361/n01491361_4.JPEG\tdepth\n"
    )
    report = json.loads((split_dir / "prepare_report.json").read_text())
    assert report["counts"] == {
        "classes": 2,
        "images": 6,
        "depth_files": 6,
        "semseg_files": 6,
        "missing_labels": 2,
        "orphan_labels": 2,
        "bad_samples": 1,
        "written": 3,
    }
    assert report["orphan_labels"] == {
        "depth": ["n01491361/n01491361_99.png"],
        "semseg": ["n09999999/n09999999_1.png"],
    }
    assert [item["modality"] for item in report["bad"]] == ["depth"]
    assert report["bad"][0]["file"].endswith(f"{BAD_STEM}.png") and "'L'" in report["bad"][0]["problem"]

    dataset = MultiModalFolder(split_dir, modalities=("rgb", "depth", "semseg"))
    assert dataset.classes == ["n01443537", "n01491361"] and len(dataset) == 3
    for index in range(len(dataset)):
        item = dataset[index]
        sample_id = int(item["semseg"][0, 0])  # paired by stem: every modality carries the same id
        assert round(float(item["depth"][0, 0, 0]) * 2**16) == 1000 * sample_id
        assert abs(int(item["rgb"][0, 0, 0]) - 30 * sample_id) <= 3  # JPEG is lossy
    assert [int(dataset[i]["semseg"][0, 0]) for i in range(3)] == [1, 3, 5]


def test_imagenet_s50_bad_label_fails_naming_it(tmp_path: Path, s50_source: dict[str, Path]) -> None:
    out = tmp_path / "pretrain"
    with pytest.raises(DataFormatError, match="--skip-bad") as info:
        _timed(
            "prepare_imagenet_s50 function, 6 images, failing on the bad label",
            lambda: prepare_imagenet_s50(
                s50_source["images"], s50_source["depth"], s50_source["semseg"], out, progress=False
            ),
        )
    bad_file = s50_source["depth"] / "n01491361" / f"{BAD_STEM}.png"
    assert f"{bad_file}: mode 'L'" in str(info.value)
    report = json.loads((out / "train" / "prepare_report.json").read_text())
    assert report["counts"]["written"] == 0 and report["bad"][0]["file"] == str(bad_file)
    assert not (out / "train" / "rgb").exists()


def test_imagenet_s50_copy_pairs_by_stem(tmp_path: Path, s50_source: dict[str, Path]) -> None:
    out = tmp_path / "pretrain"
    summary = _timed(
        "prepare_imagenet_s50 function --link copy, 6 images",
        lambda: prepare_imagenet_s50(
            s50_source["images"],
            s50_source["depth"],
            s50_source["semseg"],
            out,
            link="copy",
            skip_bad=True,
            progress=False,
        ),
    )
    assert summary["counts"]["written"] == 3
    _assert_s50_output(out / "train")
    assert not any(p.is_symlink() for p in (out / "train").rglob("*"))


def test_imagenet_s50_hardlink_and_overwrite(tmp_path: Path, s50_source: dict[str, Path]) -> None:
    out = tmp_path / "pretrain"
    args = (s50_source["images"], s50_source["depth"], s50_source["semseg"], out)
    _timed(
        "prepare_imagenet_s50 function --link hardlink, 6 images",
        lambda: prepare_imagenet_s50(*args, split="val", link="hardlink", skip_bad=True, progress=False),
    )
    _assert_s50_output(out / "val")
    assert os.stat(out / "val" / "depth" / f"{EXPECTED_WRITTEN[0]}.png").st_nlink == 2
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_imagenet_s50(*args, split="val", skip_bad=True, progress=False)
    prepare_imagenet_s50(*args, split="val", skip_bad=True, overwrite=True, progress=False)
    _assert_s50_output(out / "val")


def test_imagenet_s50_cli_symlinks(tmp_path: Path, s50_source: dict[str, Path]) -> None:
    out = tmp_path / "pretrain"
    roots = [
        "--images",
        s50_source["images"],
        "--depth",
        s50_source["depth"],
        "--semseg",
        s50_source["semseg"],
    ]
    failed = _run_cli(
        "prepare imagenet_s50 CLI subprocess, failing on the bad label (incl. interpreter start)",
        "imagenet_s50",
        *roots,
        "--out",
        out,
    )
    assert failed.returncode == 1 and failed.stderr.count("error: ") == 1 and "Traceback" not in failed.stderr
    assert f"{BAD_STEM}.png: mode 'L'" in failed.stderr

    result = _run_cli(
        "prepare imagenet_s50 CLI subprocess --link symlink --skip-bad, 6 images (incl. interpreter start)",
        "imagenet_s50",
        *roots,
        "--out",
        out,
        "--skip-bad",
    )
    assert result.returncode == 0, result.stderr
    assert "3 of 6 images written (symlink)" in result.stdout
    assert "2 image(s) lack labels" in result.stderr and "n01443537/n01443537_2.JPEG\tsemseg" in result.stderr
    _assert_s50_output(out / "train")
    link = out / "train" / "rgb" / f"{EXPECTED_WRITTEN[0]}.JPEG"
    assert (
        link.is_symlink()
        and link.resolve() == (s50_source["images"] / f"{EXPECTED_WRITTEN[0]}.JPEG").resolve()
    )
