"""Pictures while pretraining (attent_vision.lightning.pictures): helpers, both callbacks on stubs and on a
real model, and one tiny end-to-end run whose re-selection must produce a gallery."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import numpy as np
import pytest
import torch
from PIL import Image

from attent_vision.lightning.pictures import drawing
from attent_vision.lightning.pictures import pretraining as pictures
from attent_vision.seeds import item_seeds
from attent_vision.selection.contracts import SelectionSnapshot
from tests.conftest import run_train


class Bank:
    """The score-bank shape the gallery reads (as attent_vision.selection.score_bank.ScoreBank): per-sample scores
    and the step each was measured at (-1: never)."""

    def __init__(self, n: int) -> None:
        self.scores = torch.zeros(n)
        self.measured_at = torch.full((n,), -1)

    def update(self, indices: torch.Tensor, scores: torch.Tensor, *, step: int) -> None:
        self.scores[indices] = scores
        self.measured_at[indices] = step


def stub_trainer(tmp_path: Path, **kwargs: Any) -> SimpleNamespace:
    """Just what the callbacks read from a trainer (no loggers: PNG files only)."""
    defaults = dict(
        callbacks=[],
        loggers=[],
        current_epoch=0,
        global_step=0,
        max_epochs=3,
        datamodule=None,
        val_dataloaders=None,
        precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext),
        default_root_dir=str(tmp_path),
    )
    return SimpleNamespace(**{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# helpers


def test_token_mask_pixels_and_grey_out() -> None:
    mask = torch.tensor([1, 0, 0, 1])  # 2x2 tokens on a 4x4 map: 2x2-pixel patches
    pixels = pictures.token_mask_pixels(mask, (4, 4))
    assert (
        pixels.shape == (4, 4) and pixels[:2, :2].all() and pixels[2:, 2:].all() and not pixels[:2, 2:].any()
    )
    image = np.full((4, 4, 3), 200, dtype=np.uint8)
    out = pictures.grey_out(image, pixels)
    assert (out[0, 0] == pictures.MASK_GREY).all() and (out[0, 3] == 200).all()
    assert (image == 200).all()  # the input is left alone
    with pytest.raises(ValueError, match="does not tile"):
        pictures.token_mask_pixels(torch.zeros(5), (4, 4))


def test_colorize_values_uses_a_fixed_range() -> None:
    values = torch.tensor([[-10.0, -2.5], [2.5, 10.0]])
    out = drawing.colorize_values(values, pictures.DEPTH_STD_RANGE)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert (out[0, 0] == out[0, 1]).all() and (out[1, 0] == out[1, 1]).all()  # clipped to the range
    assert not (out[0, 0] == out[1, 1]).all()


def test_mosaic_lays_out_captioned_tiles() -> None:
    small = np.zeros((8, 8, 3), dtype=np.uint8)  # enlarged 20x, nearest-neighbour
    wide = np.full((50, 100, 3), 255, dtype=np.uint8)
    rows = [("first row", [drawing.Tile(small, "a"), drawing.Tile(wide, "b", frame=(0, 200, 0))]), ("", [])]
    out = drawing.mosaic(rows, "title " * 80, cell=160)  # a long title wraps over several lines
    assert out.dtype == np.uint8 and out.shape[1] == 2 * 10 + 2 * 160 + 8
    assert (out == [0, 0, 0]).all(-1).sum() >= 160 * 160  # the black tile, enlarged to the cell
    assert (out == [0, 200, 0]).all(-1).sum() > 2 * 160  # the frame


class StubTeacher:
    """A teacher as the gallery sees it: a score bank, a history of re-selections and a pool."""

    def __init__(self, bank: Bank, pool: Any = ()) -> None:
        self.bank, self.history, self.pool = bank, [], frozenset(int(i) for i in pool)

    def selection_snapshot(self) -> SelectionSnapshot:
        measured = (self.bank.measured_at >= 0) & torch.isfinite(self.bank.scores)
        return SelectionSnapshot(
            reselections=len(self.history),
            last_event=self.history[-1] if self.history else {},
            scores=self.bank.scores,
            measured=measured,
            pool=self.pool,
        )


def test_rank_samples_takes_the_measured_extremes() -> None:
    bank = Bank(5)
    bank.update(torch.tensor([0, 2, 3]), torch.tensor([1.0, 3.0, 2.0]), step=0)
    snapshot = StubTeacher(bank).selection_snapshot()
    assert snapshot.measured.tolist() == [True, False, True, True, False]
    top, bottom = pictures.rank_samples(snapshot.scores, snapshot.measured, 2)
    assert top.tolist() == [2, 3] and bottom.tolist() == [0, 3]
    top, bottom = pictures.rank_samples(snapshot.scores, snapshot.measured, 10)  # fewer measured: all of them
    assert top.tolist() == [2, 3, 0] and bottom.tolist() == [0, 3, 2]


def test_the_teachers_snapshot_shows_its_bank_history_and_pool() -> None:
    from attent_vision.selection import AtteNTTeacher
    from attent_vision.selection.contracts import ShowsSelection
    from attent_vision.selection.score_bank import ScoreBank
    from attent_vision.selection.selectors import Selection

    teacher = AtteNTTeacher()
    assert isinstance(teacher, ShowsSelection)
    empty = teacher.selection_snapshot()
    assert empty.reselections == 0 and empty.scores is None and empty.pool == frozenset()
    teacher.bank = ScoreBank(4)
    teacher.bank.update(torch.tensor([1, 3]), torch.tensor([0.5, 0.25]), step=2)
    teacher.selection = Selection(torch.tensor([1, 2]))
    teacher.history.append({"epoch": 5, "k": 2})
    snapshot = teacher.selection_snapshot()
    assert snapshot.reselections == 1 and snapshot.last_event == {"epoch": 5, "k": 2}
    assert snapshot.measured.tolist() == [False, True, False, True]
    assert snapshot.pool == frozenset({1, 2})


class ColourSet:
    """A tiny training set whose sample i is a solid image of grey level 10·i, read with ``load``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> dict[str, Any]:
        return {"rgb": Image.new("RGB", (40, 30), (10 * index,) * 3)}


def test_raw_rgb_reads_the_stored_file(tmp_path: Path) -> None:
    assert pictures.raw_rgb(ColourSet(4), 3)[0, 0].tolist() == [30, 30, 30]
    Image.new("RGB", (400, 300), (1, 2, 3)).save(tmp_path / "a.png")
    by_path = SimpleNamespace(sample_paths=lambda i: {"rgb": tmp_path / "a.png"})
    image = pictures.raw_rgb(by_path, 0)
    assert image.shape == (144, 192, 3) and image[0, 0].tolist() == [1, 2, 3]  # shrunk to THUMBNAIL_PX


# ---------------------------------------------------------------------------------------------------------------
# SelectionGallery on stubs


def test_selection_gallery_draws_once_per_reselection(tmp_path: Path) -> None:
    bank = Bank(12)
    bank.update(torch.arange(10), torch.linspace(1.0, 2.0, 10), step=5)  # samples 10, 11 never scored
    teacher = StubTeacher(bank, pool=[9, 8, 7])
    teacher.history.append({"epoch": 0})
    datamodule = SimpleNamespace(train_dataset=lambda: ColourSet(12))
    trainer = stub_trainer(tmp_path, callbacks=[teacher], datamodule=datamodule)
    gallery = pictures.SelectionGallery(output_dir=str(tmp_path), num_images=3, raise_errors=True)
    gallery.on_fit_start(trainer, None)  # a history present at fit start (resume) is not drawn again
    gallery.on_train_epoch_start(trainer, None)
    assert not (tmp_path / "selection_gallery").exists()
    teacher.history.append({"epoch": 4, "cycle": 1, "k": 3, "strategy": "hard"})
    trainer.current_epoch = 4
    gallery.on_train_epoch_start(trainer, None)
    assert [p.name for p in (tmp_path / "selection_gallery").iterdir()] == ["epoch_004.png"]
    (tmp_path / "selection_gallery" / "epoch_004.png").unlink()
    gallery.on_train_epoch_start(trainer, None)  # no new re-selection: nothing drawn
    assert not list((tmp_path / "selection_gallery").iterdir())
    with Image.open(gallery.draw(trainer, teacher.selection_snapshot(), 7)) as png:
        assert png.width > 300 and png.height > 150


def test_selection_gallery_without_teacher_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = stub_trainer(tmp_path, callbacks=[SimpleNamespace()])
    gallery = pictures.SelectionGallery(output_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=pictures.__name__):
        gallery.on_fit_start(trainer, None)
        gallery.on_train_epoch_start(trainer, None)
        gallery.on_train_epoch_start(trainer, None)
    assert sum("no AtteNT teacher" in r.getMessage() for r in caplog.records) == 1
    assert not (tmp_path / "selection_gallery").exists()


def test_a_failed_drawing_is_logged_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The training set is smaller than the score bank: drawing raises inside the callback.
    bank = Bank(4)
    bank.update(torch.arange(4), torch.ones(4), step=0)
    teacher = StubTeacher(bank)
    trainer = stub_trainer(
        tmp_path, callbacks=[teacher], datamodule=SimpleNamespace(train_dataset=lambda: [])
    )
    gallery = pictures.SelectionGallery(output_dir=str(tmp_path))
    gallery.on_fit_start(trainer, None)
    teacher.history.append({"epoch": 1})
    with caplog.at_level(logging.ERROR, logger=pictures.__name__):
        gallery.on_train_epoch_start(trainer, None)
    assert "selection gallery of epoch 1 failed" in caplog.text and "Traceback" in caplog.text
    fields = gallery.summary_fields()
    assert fields["selection_gallery_errors"] == [
        "selection gallery of epoch 1: ValueError: the score bank holds 4 scores, the training set 0"
    ]
    assert fields["selection_gallery_time_s"] >= 0
    strict = pictures.SelectionGallery(output_dir=str(tmp_path), raise_errors=True)
    strict.on_fit_start(trainer, None)
    teacher.history.append({"epoch": 2})
    with pytest.raises(ValueError, match="score bank holds 4"):
        strict.on_train_epoch_start(trainer, None)


# ---------------------------------------------------------------------------------------------------------------
# ReconstructionGrid on a real (untrained) micro MultiMAE


@pytest.fixture
def smoke_module(compose_cfg) -> Any:
    cfg = compose_cfg("experiment=smoke")
    return hydra.utils.instantiate(cfg.model, _convert_="all"), cfg


def fake_val_set(cfg: Any, n: int) -> list[dict[str, torch.Tensor]]:
    size, stride = cfg.data.input_size, cfg.data.semseg_stride
    g = torch.Generator().manual_seed(0)
    return [
        {
            "rgb": torch.randn(3, size, size, generator=g),
            "depth": torch.rand(1, size, size, generator=g) + 0.1,
            "semseg": torch.randint(0, cfg.data.num_classes, (size // stride, size // stride), generator=g),
            "index": torch.tensor(i),
            "label": torch.tensor(0),
        }
        for i in range(n)
    ]


def test_reconstruction_grid_uses_val_masks_and_leaves_the_rng_alone(tmp_path: Path, smoke_module) -> None:
    module, cfg = smoke_module
    val_set = fake_val_set(cfg, 10)
    trainer = stub_trainer(
        tmp_path, datamodule=SimpleNamespace(val_set=val_set), current_epoch=4, max_epochs=5
    )
    grid = pictures.ReconstructionGrid(output_dir=str(tmp_path), num_samples=3, raise_errors=True)
    module.train()
    rng = torch.get_rng_state()
    targets, preds, masks = grid.reconstruct(trainer, module)
    assert torch.equal(torch.get_rng_state(), rng) and module.training
    assert grid.samples(trainer)["index"].tolist() == [0, 4, 9]  # spread over the split
    # The masks are the validation masks: the same seeds as validation_step, so the same as a second draw.
    again = grid.reconstruct(trainer, module)[2]
    assert all(torch.equal(masks[t], again[t]) for t in module.in_domains)
    index = grid.samples(trainer)["index"]
    seeds = item_seeds("val_mask", module.val_mask_seed, index=index)  # what validation_step draws from
    expected = module.net.forward_features({t: targets[t] for t in module.in_domains}, seeds).masks.task_masks
    assert all(torch.equal(masks[t], expected[t]) for t in module.in_domains)
    rows = pictures.reconstruction_rows(module, targets, preds, masks)
    assert len(rows) == 3 and [c for c, _ in rows[0]][:3] == [
        f"rgb, {100 * masks['rgb'][0].float().mean():.0f}% masked",
        "rgb prediction",
        "rgb target",
    ]
    assert [c for c, _ in rows[0]][3:] == [
        f"depth (std.), {100 * masks['depth'][0].float().mean():.0f}% masked",
        "depth (std.) prediction",
        "depth (std.) target",
        f"semseg, {100 * masks['semseg'][0].float().mean():.0f}% masked",
        "semseg prediction",
        "semseg target",
    ]
    # epoch 4 of 5 is the last: drawn although every_n_epochs (10) does not divide it
    grid.on_train_epoch_end(trainer, module)
    trainer.current_epoch = 2
    grid.on_train_epoch_end(trainer, module)
    assert sorted(p.name for p in (tmp_path / "reconstructions").iterdir()) == ["epoch_004.png"]
    with Image.open(tmp_path / "reconstructions" / "epoch_004.png") as png:
        assert png.width > png.height > 200


# ---------------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_tiny_run_writes_reconstructions_gallery_and_tensorboard_images(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_train(
        [
            "experiment=smoke",
            "selection=hard",  # epoch 0 full data, epoch 1 on a re-selected subset (see print_plan=true)
            "data.synthetic.num_train=16",
            "data.synthetic.num_val=8",
            "logger=tensorboard",
            "validate_before_training=false",
            "trainer.enable_progress_bar=false",
            "callbacks.reconstructions.every_n_epochs=1",
            "callbacks.reconstructions.raise_errors=true",
            "callbacks.selection_gallery.raise_errors=true",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    events = [json.loads(line) for line in (run_dir / "selection.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events] == [1]
    assert sorted(p.name for p in (run_dir / "selection_gallery").iterdir()) == ["epoch_001.png"]
    assert sorted(p.name for p in (run_dir / "reconstructions").iterdir()) == [
        "epoch_000.png",
        "epoch_001.png",
    ]
    assert (
        "selection gallery:" not in (run_dir / "pretrain.log").read_text()
    )  # found the teacher, scores, pool
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and not any(k.endswith("_errors") for k in summary)
    assert summary["reconstruction_time_s"] > 0 and summary["selection_gallery_time_s"] > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = (run_dir / "tensorboard").rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(event_file), size_guidance={"images": 0})
    accumulator.Reload()
    images = {tag: len(accumulator.Images(tag)) for tag in accumulator.Tags()["images"]}
    assert images == {"pretrain/reconstructions": 2, "teacher/selection_gallery": 1}
