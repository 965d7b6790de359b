"""docs/real-data.md, followed on a miniature ImageNet-S50 in its published layout: the classification recipe reads
``validation/``, and the documented ``prepare imagenet_s50`` commands (train and ``--split val``) turn the images
plus per-class pseudo labels into the pretraining layout that ``train.py data=multitask_folder`` trains on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import ROOT, read_summary, run_finetune, run_train

pytestmark = pytest.mark.slow

WNIDS = ["n01443537", "n01491361"]  # two of ImageNet-S50's 50 classes
PER_CLASS = {"train": 6, "validation": 3}


def _imagenet_s50(root: Path, pseudo: Path) -> None:
    """ImageNetS50/{train,validation}/<wnid>/*.JPEG as LUSSeg's data_preparation.sh writes it, and MultiMAE-style
    pseudo labels <pseudo>/{train,val}/{depth,semseg}/<wnid>/<stem>.png (what the per-class archives unpack to)."""
    rng = np.random.default_rng(0)
    for split, count in PER_CLASS.items():
        label_split = "train" if split == "train" else "val"
        for c, wnid in enumerate(WNIDS):
            for i in range(count):
                stem = f"{wnid}_{i}" if split == "train" else f"ILSVRC2012_val_{c * 10 + i:08d}"
                rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                rgb[..., c] = 255  # a class cue the classifier can learn
                for folder, image in (
                    (root / split / wnid, Image.fromarray(rgb)),
                    (
                        pseudo / label_split / "depth" / wnid,
                        Image.fromarray(rng.integers(0, 65535, (40, 48), dtype=np.uint16)),
                    ),
                    (
                        pseudo / label_split / "semseg" / wnid,
                        Image.fromarray(rng.integers(0, 133, (40, 48), dtype=np.uint8)),
                    ),
                ):
                    folder.mkdir(parents=True, exist_ok=True)
                    suffix = ".JPEG" if folder.is_relative_to(root) else ".png"
                    image.save(folder / f"{stem}{suffix}")


def test_imagenet_s50_recipe_reads_validation_and_prepare_builds_the_pretraining_layout(
    tmp_path: Path,
) -> None:
    s50, pseudo, multitask = (
        tmp_path / "ImageNetS50",
        tmp_path / "pseudo",
        tmp_path / "imagenet-s50-multitask",
    )
    _imagenet_s50(s50, pseudo)

    # Fine-tuning recipe on the raw folders: it evaluates on validation/ (no val/ exists here).
    tiny = ["encoder=micro", "encoder.patch_size=8", "trainer=cpu", "trainer.max_epochs=1"]
    tiny += ["data.input_size=32", "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0"]
    tiny += ["data.num_classes=2", "trainer.enable_progress_bar=false"]
    run_finetune(["experiment=ft_imagenet_s50_cls", f"data.root={s50}", *tiny], cwd=tmp_path)
    (run,) = (tmp_path / "outputs" / "finetune" / "runs").iterdir()
    summary = read_summary(run)
    assert summary["status"] == "finished"
    assert summary["history"][-1]["top1"] is not None  # evaluated, on validation/: no val/ folder exists

    # The two documented prepare commands, then pretraining on their output.
    for split, images, labels in (("train", "train", "train"), ("val", "validation", "val")):
        prepare = [sys.executable, "-m", "attent_vision.data.prepare", "imagenet_s50", "--no-progress"]
        sources = [
            "--images",
            s50 / images,
            "--depth",
            pseudo / labels / "depth",
            "--semseg",
            pseudo / labels / "semseg",
        ]
        proc = subprocess.run(
            [*prepare, *map(str, sources), "--out", str(multitask), "--split", split],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        count = len(WNIDS) * PER_CLASS[images]
        for modality in ("rgb", "depth", "semseg"):
            assert len(list((multitask / split / modality).glob("*/*"))) == count, (split, modality)
    pretrain = ["data=multitask_folder", f"data.root={multitask}", "model=micro", "model.net.patch_size=8"]
    pretrain += ["data.input_size=32", "data.batch_size=4", "data.num_workers=0", "data.num_classes=133"]
    pretrain += ["trainer=cpu", "trainer.max_epochs=1", "selection=none", "trainer.enable_progress_bar=false"]
    run_train(pretrain, cwd=tmp_path)
    (run,) = (tmp_path / "outputs" / "pretrain" / "runs").iterdir()
    summary = read_summary(run)
    assert summary["status"] == "finished" and summary["samples_seen"] == len(WNIDS) * PER_CLASS["train"]
    assert summary["final_val_loss"] is not None  # validated on the prepared val split
