"""Embedded downstream data and the downstream DataModules: formats, splits, transforms, bad input."""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from attent_vision.data.constants import IMAGE_EXTENSIONS
from attent_vision.data.downstream import ClassificationDataModule, DenseDataModule, ImageFolderItems
from attent_vision.data.modalities import DataFormatError, is_image_file
from attent_vision.data.synthetic import ensure_synthetic_dataset
from attent_vision.data.synthetic.downstream import (
    NYU_DEPTH_SCALE,
    ensure_classification_scenes,
    ensure_nyu_like_scenes,
)
from attent_vision.data.transforms import DenseTransform


@pytest.fixture(scope="module")
def downstream_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("downstream")
    ensure_classification_scenes(root / "cls", num_train=30, num_eval=12, image_size=40)
    ensure_nyu_like_scenes(root / "nyu", num_train=12, num_eval=6, image_size=40)
    return root


def _digests(folder: Path, pattern: str) -> set[str]:
    return {hashlib.sha1(np.asarray(Image.open(p)).tobytes()).hexdigest() for p in folder.glob(pattern)}


def test_downstream_images_are_not_pretraining_images(downstream_root: Path, tmp_path: Path) -> None:
    pretrain = ensure_synthetic_dataset(tmp_path / "pre", num_train=30, num_val=12, image_size=40)
    seen = _digests(pretrain, "*/rgb/*/*.png")
    cls = _digests(downstream_root / "cls", "*/*/*.png")
    nyu = _digests(downstream_root / "nyu", "*/rgb/data/*.png")
    assert len(seen) == 42 and len(cls) == 42 and len(nyu) == 18
    assert not seen & cls and not seen & nyu and not cls & nyu


def test_classification_layout_is_imagefolder(downstream_root: Path) -> None:
    meta = json.loads((downstream_root / "cls" / "meta.json").read_text())
    for split, count in (("train", 30), ("val", 12)):
        classes = sorted(p.name for p in (downstream_root / "cls" / split).iterdir())
        assert classes == ["cone", "cube", "cylinder", "pyramid", "sphere", "torus"]
        assert sum(meta["counts"][split].values()) == count
        assert len(list((downstream_root / "cls" / split).glob("*/*.png"))) == count


def test_nyu_like_layout_and_encodings(downstream_root: Path) -> None:
    root = downstream_root / "nyu"
    for split, count in (("train", 12), ("test", 6)):
        for modality in ("rgb", "depth", "semseg"):
            names = sorted(p.name for p in (root / split / modality / "data").iterdir())
            assert names == [f"{i:04d}.png" for i in range(count)]
    depth = Image.open(root / "test" / "depth" / "data" / "0000.png")
    labels = Image.open(root / "test" / "semseg" / "data" / "0000.png")
    assert depth.mode in ("I;16", "I") and labels.mode == "L"
    metres = np.asarray(depth, dtype=np.float64) / NYU_DEPTH_SCALE
    valid = metres[metres > 0]
    assert valid.min() > 0.5 and valid.max() <= 8.0  # readings end at the 8 m sensor range
    ids = np.asarray(labels)
    assert ids.max() <= 8 and (ids == 0).any()  # 0 = unlabeled boundaries, 1..8 classes
    meta = json.loads((root / "meta.json").read_text())
    assert meta["semseg"]["class_names"][0] == "floor" and len(meta["semseg"]["class_names"]) == 8


def test_generation_is_reused_and_refuses_foreign_folders(downstream_root: Path, tmp_path: Path) -> None:
    stamp = (downstream_root / "cls" / "meta.json").stat().st_mtime_ns
    ensure_classification_scenes(downstream_root / "cls", num_train=30, num_eval=12, image_size=40)
    assert (downstream_root / "cls" / "meta.json").stat().st_mtime_ns == stamp
    (tmp_path / "foreign" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="refusing"):
        ensure_classification_scenes(tmp_path / "foreign", num_train=4, num_eval=2, image_size=40)


def test_classification_datamodule_items_and_class_count(downstream_root: Path) -> None:
    dm = ClassificationDataModule(
        root=str(downstream_root / "cls"), num_classes=6, input_size=32, batch_size=4
    )
    dm.setup()
    item = dm.train_set[0]
    assert item["rgb"].shape == (3, 32, 32) and item["label"].dtype == torch.int64
    assert int(item["index"]) == 0
    assert dm.val_targets().shape == (12,)
    wrong = ClassificationDataModule(root=str(downstream_root / "cls"), num_classes=50, input_size=32)
    with pytest.raises(DataFormatError, match=r"6 class folders but data\.num_classes=50"):
        wrong.setup()


def test_corrupt_classification_image_is_named(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "ok.png")
    bad = tmp_path / "train" / "a" / "bad.png"
    bad.write_bytes(b"not a png")
    dm = ClassificationDataModule(root=str(tmp_path), num_classes=2, input_size=16)
    dm.setup()
    index = next(i for i, (path, _) in enumerate(dm.train_set.samples) if path.endswith("bad.png"))
    with pytest.raises(DataFormatError, match=r"bad\.png"):
        dm.train_set[index]


def test_multimodal_folder_and_image_folder_accept_the_same_files(tmp_path: Path) -> None:
    """constants.IMAGE_EXTENSIONS is written out (importing torchvision loads torch); it must track torchvision's."""
    assert tuple(ext.lstrip(".") for ext in IMG_EXTENSIONS) == IMAGE_EXTENSIONS
    folder = tmp_path / "a"
    folder.mkdir()
    for name in ("x.PNG", "y.jpeg", "notes.txt", "z.jpx"):
        (folder / name).write_bytes(b"")
    assert [Path(path).name for path, _ in ImageFolderItems(tmp_path).samples] == ["x.PNG", "y.jpeg"]
    assert sorted(p.name for p in folder.iterdir() if is_image_file(p)) == ["x.PNG", "y.jpeg"]


def test_reduce_zero_label_and_depth_in_metres() -> None:
    transform = DenseTransform(train=False, input_size=8, pad_to=8)
    labels = np.array([[0, 1, 2, 255]] * 4, dtype=np.uint8).repeat(2, axis=1)  # 4 x 8
    depth = np.full((4, 8), 6554, dtype=np.uint16)  # 6554 / 6553.6 = 1.00006 m
    rgb = Image.fromarray(np.zeros((4, 8, 3), np.uint8))
    out = transform({"rgb": rgb, "semseg": labels, "depth": depth})
    assert out["rgb"].shape == (3, 8, 8) and out["semseg"].shape == (8, 8) and out["depth"].shape == (1, 8, 8)
    # unlabeled (0) and 255 are ignored, the others shift down by one; the padded rows are ignored / invalid
    assert out["semseg"][0].tolist() == [255, 255, 0, 0, 1, 1, 255, 255]
    assert (out["semseg"][4:] == 255).all()
    assert torch.allclose(out["depth"][0, :4], torch.full((4, 8), 6554 * 10 / 65536))
    assert (out["depth"][0, 4:] == 0).all()


def test_train_transform_keeps_modalities_aligned() -> None:
    # Image, labels and depth are functions of the column: after any flip/scale/crop they must still agree.
    height, width = 40, 48
    ramp = np.tile(np.arange(width, dtype=np.uint8) * 5, (height, 1))
    rgb = Image.fromarray(np.stack([ramp] * 3, axis=-1))
    labels = (ramp // 50 + 1).astype(np.uint8)  # 1..5, reduced to 0..4
    depth = (ramp.astype(np.uint16) + 1) * 100
    for augmentation in ("semseg", "nyu"):
        transform = DenseTransform(train=True, input_size=32, augmentation=augmentation, color_augs=True)
        torch.manual_seed(0)
        for _ in range(8):
            out = transform({"rgb": rgb, "semseg": labels, "depth": depth})
            has_depth = out["depth"][0] > 0
            assert torch.equal(has_depth, out["semseg"] != 255)  # padding is ignored in both
            column = (out["depth"][0][has_depth] * 65536 / 10 / 100 - 1).round()  # the ramp value, from depth
            assert torch.equal(out["semseg"][has_depth], (column // 50).long())
            # Colour jitter on a grey ramp is monotonic: the image still increases with the depth ordering.
            grey = out["rgb"][0][has_depth]
            ranks = lambda x: x.argsort().argsort().double()  # noqa: E731
            rho = torch.corrcoef(torch.stack([ranks(grey), ranks(column)]))[0, 1]
            assert rho > 0.95 or column.unique().numel() < 3


def test_dense_datamodule_rejects_labels_beyond_num_classes(downstream_root: Path) -> None:
    from attent_vision.lightning.finetune import SegmentationModule
    from attent_vision.models import build_multivit
    from attent_vision.models.heads import ConvNeXtHead

    dm = DenseDataModule(
        root=str(downstream_root / "nyu"), target="semseg", num_classes=4, input_size=32, pad_to=8
    )
    dm.setup()
    # A real 4-class segmentation module (micro encoder, a narrow ConvNeXt head): its chance level reads every
    # evaluation label map first, and the generated ones go up to 8.
    head = partial(ConvNeXtHead, num_classes=4, main_tasks=["rgb"], embed_dim=64)
    net = build_multivit(size="micro", image_size=32, patch_size=8, heads={"semseg": head})
    module = SegmentationModule(net=net, num_classes=4)
    with pytest.raises(DataFormatError, match=r"semseg/data/0000\.png: label ids .* outside \[0, 4\)"):
        module.chance_metrics(dm)


def test_randaugment_posterize_to_zero_bits_is_fixed_only_in_our_transform(tmp_path: Path) -> None:
    from PIL import Image
    from timm.data import auto_augment

    before = dict(auto_augment.NAME_TO_OP)
    module = ClassificationDataModule(root=str(tmp_path), num_classes=2, input_size=32)
    assert before == auto_augment.NAME_TO_OP  # timm's table is left as it was
    ops = [
        op
        for t in module.train_transform.transforms
        if isinstance(t, auto_augment.RandAugment)
        for op in t.ops
        if op.name.startswith("Posterize")
    ]
    assert ops, "the reference policy has posterize ops"
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    for op in ops:
        assert op.aug_fn(image, 0).getextrema() == ((0, 0), (0, 0), (0, 0))  # 0 bits: black, not an error
        assert op.aug_fn(image, 8) is image
