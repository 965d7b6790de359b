"""Downstream metrics: hand-computed values, ignored/invalid pixels, and DDP correctness on a 2-process gloo group."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DistributedSampler

from attent_vision.lightning.metrics import (
    ClassificationMetrics,
    DepthMetrics,
    SegmentationMetrics,
    berhu_loss,
    depth_valid_mask,
    eigen_crop_mask,
)

NAN = math.nan

# ------------------------------------------------------------------------------------------------------------
# Classification
# ------------------------------------------------------------------------------------------------------------


def test_classification_top1_top5_hand_computed():
    # 4 samples, 6 classes; the rank of the target in each row is noted on the right.
    logits = torch.tensor(
        [
            [9.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # target 0: rank 1
            [1.0, 9.0, 8.0, 7.0, 6.0, 5.0],  # target 2: rank 2
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # target 5: rank 6 (outside the top 5)
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # target 1: rank 5
        ]
    )
    target = torch.tensor([0, 2, 5, 1])
    out = ClassificationMetrics(num_classes=6)(logits, target)
    assert set(out) == {"top1", "top5"}
    assert out["top1"].item() == pytest.approx(25.0)  # 1 of 4
    assert out["top5"].item() == pytest.approx(75.0)  # 3 of 4


def test_classification_skips_top_k_above_num_classes():
    # 3 samples, 4 classes; only top1 and top2 exist for top_k=(1, 2, 5).
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.0],  # target 1: rank 1
            [0.5, 0.4, 0.3, 0.2],  # target 1: rank 2
            [0.5, 0.4, 0.3, 0.2],  # target 3: rank 4
        ]
    )
    target = torch.tensor([1, 1, 3])
    m = ClassificationMetrics(num_classes=4, top_k=(1, 2, 5))
    m.update(logits, target)
    out = m.compute()
    assert set(out) == {"top1", "top2"}
    assert out["top1"].item() == pytest.approx(100 / 3)
    assert out["top2"].item() == pytest.approx(200 / 3)
    # Default (1, 5) with 3 classes: top-5 would be a constant 100%, so it is not reported.
    three = ClassificationMetrics(num_classes=3)
    three.update(logits[:, :3], torch.tensor([1, 1, 0]))
    assert set(three.compute()) == {"top1"}


def test_classification_accumulates_like_one_big_batch():
    logits = torch.randn(10, 7, generator=torch.Generator().manual_seed(0))
    # Top-1 correct for all of the first 3 samples and 2 of the last 7: 5/10 = 50% overall.
    target = (logits.argmax(1) + torch.tensor([0, 0, 0, 0, 1, 2, 0, 3, 1, 4])) % 7
    split = ClassificationMetrics(num_classes=7)
    split.update(logits[:3], target[:3])
    split.update(logits[3:], target[3:])
    whole = ClassificationMetrics(num_classes=7)
    whole.update(logits, target)
    got, want = split.compute(), whole.compute()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].item() == pytest.approx(want[k].item())
    assert want["top1"].item() == pytest.approx(50.0)
    # forward() returns the batch value (100% for the first 3); a mean of batch values, (100 + 28.6) / 2, would be
    # wrong, so the equality above tests dataset-level accumulation.
    step = ClassificationMetrics(num_classes=7)
    assert step(logits[:3], target[:3])["top1"].item() == pytest.approx(100.0)
    assert step(logits[3:], target[3:])["top1"].item() == pytest.approx(200 / 7)
    assert step.compute()["top1"].item() == pytest.approx(50.0)


# ------------------------------------------------------------------------------------------------------------
# Segmentation
# ------------------------------------------------------------------------------------------------------------

I = 255  # noqa: E741  (ignored pixel)
SEG_GT = torch.tensor([[[0, 0, 1], [1, I, I]]])  # [1, 2, 3]; class 2 never occurs in the ground truth


def _one_hot_logits(ids: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(ids, num_classes).permute(0, 3, 1, 2).float()  # [B, K, H, W]


def test_segmentation_hand_computed_and_ignored_pixels_do_not_count():
    # Counted pixels (gt -> pred): 0->0, 0->1, 1->1, 1->1. Confusion matrix (rows = gt):
    #   [[1, 1, 0],
    #    [0, 2, 0],
    #    [0, 0, 0]]
    # class 0: TP 1, FN 1, FP 0 -> IoU 1/2 = 50,    Acc 1/2 = 50
    # class 1: TP 2, FN 0, FP 1 -> IoU 2/3 = 66.67, Acc 2/2 = 100
    # class 2: not in gt, never predicted -> IoU, Acc NaN: excluded
    # mIoU = (50 + 66.67) / 2 = 58.33, mAcc = (50 + 100) / 2 = 75, aAcc = 3/4 = 75
    pred_a = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    pred_b = torch.tensor([[[0, 1, 1], [1, 1, 1]]])  # differs from pred_a only at the ignored pixels
    results = []
    for pred in (pred_a, pred_b):
        for as_logits in (False, True):
            m = SegmentationMetrics(num_classes=3)
            m.update(_one_hot_logits(pred) if as_logits else pred, SEG_GT)
            results.append((m.compute(), m.confusion_matrix(), m.per_class()))
    for out, cm, per_class in results:
        assert out["mIoU"].item() == pytest.approx(175 / 3)
        assert out["mAcc"].item() == pytest.approx(75.0)
        assert out["aAcc"].item() == pytest.approx(75.0)
        assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
        assert per_class["IoU"][:2] == pytest.approx([50.0, 200 / 3])
        assert per_class["Acc"][:2] == pytest.approx([50.0, 100.0])
        assert math.isnan(per_class["IoU"][2])
        assert math.isnan(per_class["Acc"][2])


def test_segmentation_class_absent_from_gt_but_predicted_follows_mmseg():
    # As above but pixel (0, 1) (gt 0) is predicted as 2, a class that never occurs in the ground truth:
    #   [[1, 0, 1],
    #    [0, 2, 0],
    #    [0, 0, 0]]
    # class 0: IoU 1/2 = 50, Acc 50; class 1: IoU 2/2 = 100, Acc 100
    # class 2: TP 0, FP 1 -> IoU 0/1 = 0 (counts in mIoU, as in mmseg), Acc 0/0 = NaN (excluded from mAcc)
    # mIoU = (50 + 100 + 0) / 3 = 50, mAcc = (50 + 100) / 2 = 75, aAcc = 3/4 = 75
    m = SegmentationMetrics(num_classes=3)
    m.update(torch.tensor([[[0, 2, 1], [1, 0, 2]]]), SEG_GT)
    out = m.compute()
    assert out["mIoU"].item() == pytest.approx(50.0)
    assert out["mAcc"].item() == pytest.approx(75.0)
    assert out["aAcc"].item() == pytest.approx(75.0)
    per_class = m.per_class()
    assert per_class["IoU"][2] == 0.0
    assert math.isnan(per_class["Acc"][2])


def test_segmentation_is_one_dataset_level_matrix_not_a_mean_over_batches():
    # Two images; the asymmetric off-diagonal entry shows rows = gt, cols = prediction.
    gt = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [2, I]]])
    pred = torch.tensor([[[0, 0], [0, 1]], [[1, 1], [2, 0]]])
    acc = SegmentationMetrics(num_classes=3)
    acc.update(pred[:1], gt[:1])
    acc.update(pred[1:], gt[1:])
    # gt 0 -> pred 1 once: entry [0, 1], not [1, 0].
    assert acc.confusion_matrix().tolist() == [[3, 1, 0], [0, 2, 0], [0, 0, 1]]
    # IoU: class 0 3/4, class 1 2/3, class 2 1/1 -> mIoU = (75 + 66.67 + 100) / 3 = 80.56; aAcc = 6/7
    out = acc.compute()
    assert out["mIoU"].item() == pytest.approx((75 + 200 / 3 + 100) / 3)
    assert out["aAcc"].item() == pytest.approx(600 / 7)
    acc.reset()
    assert acc.confusion_matrix().sum().item() == 0


def test_segmentation_rejects_bad_ids():
    m = SegmentationMetrics(num_classes=3)
    with pytest.raises(ValueError, match="target"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="collides"):
        SegmentationMetrics(num_classes=3, ignore_index=1)


# ------------------------------------------------------------------------------------------------------------
# Depth
# ------------------------------------------------------------------------------------------------------------

# Valid pixels (row-major): t = 1, 2, 4, 5 with p = 1, 3, 2, 5. Invalid: 0 (missing), 20 (> max_depth), NaN.
DEPTH_T = torch.tensor([[1.0, 2.0, 4.0], [0.0, 20.0, NAN], [5.0, 0.0, 20.0]])
DEPTH_P = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
# Hand values over the 4 valid pixels: d = p - t = 0, 1, -2, 0; max(p/t, t/p) = 1, 1.5, 2, 1.
DEPTH_EXPECTED = {
    "delta1": 50.0,  # ratios < 1.25: 1, 1
    "delta2": 75.0,  # < 1.5625: 1, 1.5, 1
    "delta3": 75.0,  # < 1.953125: 1, 1.5, 1 (2 is not)
    "abs_rel": (0 + 1 / 2 + 2 / 4 + 0) / 4,  # 0.25
    "sq_rel": (0 + 1 / 2 + 4 / 4 + 0) / 4,  # 0.375
    "rmse": math.sqrt((0 + 1 + 4 + 0) / 4),  # 1.1180
    "rmse_log": math.sqrt((math.log(1.5) ** 2 + math.log(2) ** 2) / 4),  # 0.4015
    "log10": (math.log10(1.5) + math.log10(2)) / 4,  # 0.1193
}


@pytest.mark.parametrize("garbage", [NAN, -5.0, 1e9, 0.0, math.inf])
@pytest.mark.parametrize("with_channel", [False, True])
def test_depth_hand_computed_and_invalid_pixels_ignored(garbage: float, with_channel: bool):
    pred = DEPTH_P.clone()
    pred[~depth_valid_mask(DEPTH_T, min_depth=1e-3, max_depth=10.0)] = garbage
    pred, target = pred[None], DEPTH_T[None]  # [1, 3, 3]
    if with_channel:
        pred, target = pred[:, None], target[:, None]  # [1, 1, 3, 3]
    m = DepthMetrics(max_depth=10.0)
    m.update(pred, target)
    out = m.compute()
    assert set(out) == set(DEPTH_EXPECTED)
    for k, v in DEPTH_EXPECTED.items():
        assert out[k].item() == pytest.approx(v, rel=1e-6), k


def test_depth_valid_mask_and_prediction_clamp():
    t = torch.tensor([0.0, 5e-4, 1e-3, 10.0, 10.5, NAN, math.inf, -1.0])
    assert depth_valid_mask(t, min_depth=1e-3, max_depth=10.0).tolist() == [
        False, False, True, True, False, False, False, False,
    ]  # fmt: skip
    # p = 100 at t = 5 is clamped to max_depth 10: abs_rel = |10 - 5| / 5 = 1, not 19; delta1 = 0 (ratio 2).
    # p = -3 at t = 1 is clamped to min_depth 0.5: abs_rel 0.5, ratio 2, log10 |log10 0.5| = 0.30103.
    m = DepthMetrics(min_depth=0.5, max_depth=10.0)
    m.update(torch.tensor([[[100.0, -3.0]]]), torch.tensor([[[5.0, 1.0]]]))
    out = m.compute()
    assert out["abs_rel"].item() == pytest.approx((1.0 + 0.5) / 2)
    assert out["delta1"].item() == 0.0
    assert out["log10"].item() == pytest.approx(math.log10(2))
    assert math.isfinite(out["rmse_log"].item())


def test_eigen_crop_ignores_pixels_outside_the_crop():
    mask = eigen_crop_mask(480, 640)
    assert mask.sum().item() == (471 - 45) * (601 - 41)
    assert mask[45, 41] and mask[470, 600]
    assert not mask[44, 41] and not mask[45, 40] and not mask[471, 600] and not mask[470, 601]
    # Other sizes scale the bounds: 240x320 -> rows 22.5..235.5 -> 23:236, cols 20.5..300.5 -> 21:301.
    half = eigen_crop_mask(240, 320)
    rows, cols = half.any(dim=1).nonzero().squeeze(1), half.any(dim=0).nonzero().squeeze(1)
    assert (rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1) == (
        23,
        236,
        21,
        301,
    )

    target = torch.full((1, 1, 480, 640), 2.0)
    pred = torch.full_like(target, 8.0)  # badly wrong outside the crop...
    pred[..., 45:471, 41:601] = 2.0  # ...exact inside it
    cropped, full = DepthMetrics(eigen_crop=True), DepthMetrics(eigen_crop=False)
    cropped.update(pred, target)
    full.update(pred, target)
    out = cropped.compute()
    assert out["abs_rel"].item() == 0.0
    assert out["delta1"].item() == 100.0
    assert full.compute()["abs_rel"].item() > 0.1


def test_berhu_below_and_above_threshold():
    # Valid d = 0.1, -1, 0.5, 2 -> c = 0.2 * 2 = 0.4. The 4th pixel (NaN target) is invalid and must not set c.
    target = torch.tensor([1.0, 2.0, 1.0, 1.0, NAN])
    pred = torch.tensor([1.1, 1.0, 1.5, 3.0, 100.0], requires_grad=True)
    valid = torch.isfinite(target)
    # 0.1 <= c -> 0.1; 1 -> (1 + 0.16) / 0.8 = 1.45; 0.5 -> (0.25 + 0.16) / 0.8 = 0.5125; 2 -> 4.16 / 0.8 = 5.2
    loss = berhu_loss(pred, target, valid)
    assert loss.item() == pytest.approx((0.1 + 1.45 + 0.5125 + 5.2) / 4)
    loss.backward()
    # d/dp: sign(d) = 1 below c; d / c above c (c constant); divided by 4 valid pixels; 0 for the invalid one.
    assert pred.grad.tolist() == pytest.approx([0.25, -1 / 0.4 / 4, 0.5 / 0.4 / 4, 2 / 0.4 / 4, 0.0])
    # At |d| == c both branches agree: (c² + c²) / 2c = c.
    t = torch.tensor([0.0, 0.0])
    assert berhu_loss(torch.tensor([0.4, 2.0]), t, torch.tensor([True, True])).item() == pytest.approx(
        (0.4 + 4.16 / 0.8) / 2
    )


def test_berhu_no_valid_pixel_is_zero_with_finite_grad():
    pred = torch.tensor([[1.0, 2.0]], requires_grad=True)
    target = torch.tensor([[NAN, 0.0]])
    loss = berhu_loss(pred, target, torch.zeros(1, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert pred.grad is not None
    assert torch.isfinite(pred.grad).all() and (pred.grad == 0).all()


# ------------------------------------------------------------------------------------------------------------
# DDP: 7 samples on 2 ranks
# ------------------------------------------------------------------------------------------------------------

N_EVAL = 7  # odd on purpose: a padding sampler must repeat one sample to give both ranks 4


def _eval_set() -> dict[str, torch.Tensor]:
    """Deterministic 7-sample evaluation set for all three tasks (built identically in every process)."""
    gen = torch.Generator().manual_seed(1234)
    cls_logits = torch.randn(N_EVAL, 6, generator=gen)  # [7, 6]
    # Top-1 correct for samples 0, 1, 4 only: 3/7 overall, but 4/8 if sample 0 is counted twice.
    cls_target = (cls_logits.argmax(1) + torch.tensor([0, 0, 1, 2, 0, 3, 1])) % 6  # [7]
    seg_logits = torch.randn(N_EVAL, 3, 4, 4, generator=gen)  # [7, 3, 4, 4]
    seg_target = torch.randint(0, 3, (N_EVAL, 4, 4), generator=gen)
    seg_target[torch.rand(N_EVAL, 4, 4, generator=gen) < 0.2] = 255
    depth_target = torch.rand(N_EVAL, 1, 4, 4, generator=gen) * 12  # some > max_depth 10
    depth_target[:, :, 0, 0] = 0.0
    depth_target[:, :, 1, 1] = NAN
    depth_pred = depth_target.nan_to_num(3.0) * (0.7 + 0.6 * torch.rand(N_EVAL, 1, 4, 4, generator=gen))
    return {
        "cls_logits": cls_logits,
        "cls_target": cls_target,
        "seg_logits": seg_logits,
        "seg_target": seg_target,
        "depth_pred": depth_pred,
        "depth_target": depth_target,
    }


def _evaluate(indices: list[int]) -> dict[str, object]:
    """Update the three metrics with ``indices`` in batches of 2 and compute (syncs across ranks if any)."""
    data = _eval_set()
    cls, seg, depth = ClassificationMetrics(num_classes=6), SegmentationMetrics(num_classes=3), DepthMetrics()
    for start in range(0, len(indices), 2):
        idx = torch.tensor(indices[start : start + 2])
        cls.update(data["cls_logits"][idx], data["cls_target"][idx])
        seg.update(data["seg_logits"][idx], data["seg_target"][idx])
        depth.update(data["depth_pred"][idx], data["depth_target"][idx])
    with depth.sync_context():
        n_pixels = depth.n.item()
    return {
        "cls": {k: v.item() for k, v in cls.compute().items()},
        "seg": {k: v.item() for k, v in seg.compute().items()},
        "depth": {k: v.item() for k, v in depth.compute().items()},
        "confmat": seg.confusion_matrix().tolist(),
        "depth_pixels": n_pixels,
        "local": list(indices),
    }


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Spawned per rank (top level so it pickles by reference): evaluate this rank's shard with both samplers."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),  # fail the test rather than hang if a rank dies
    )
    try:
        dataset = list(range(N_EVAL))
        unrepeated = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        padded = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        result = {"unrepeated": _evaluate(list(unrepeated)), "padded": _evaluate(list(padded))}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, nan_ok=True), k


def test_ddp_two_ranks_match_single_process_and_padding_double_counts(tmp_path: Path):
    world_size = 2
    # fork where available: spawned children would re-import torchmetrics (10+ s each on a 2-core box). The
    # worker is top level so the spawn fallback can pickle it by reference.
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    args = (world_size, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_ddp_worker, args=args, nprocs=world_size, join=True, start_method=start_method)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    single = _evaluate(list(range(N_EVAL)))  # no process group here: plain local compute

    # UnrepeatedDistributedSampler: 4 + 3 samples, each exactly once; every rank sees the whole-set values.
    assert [r["unrepeated"]["local"] for r in ranks] == [[0, 2, 4, 6], [1, 3, 5]]
    for r in ranks:
        got = r["unrepeated"]
        for task in ("cls", "seg", "depth"):
            _assert_same(got[task], single[task])
        assert got["confmat"] == single["confmat"]
        assert got["depth_pixels"] == single["depth_pixels"]
    assert single["cls"]["top1"] == pytest.approx(300 / 7)

    # DistributedSampler pads 7 -> 8 by repeating sample 0 on rank 1, so sample 0 is counted twice and every
    # metric drifts from the true whole-set value. That is why evaluation uses UnrepeatedDistributedSampler.
    assert [r["padded"]["local"] for r in ranks] == [[0, 2, 4, 6], [1, 3, 5, 0]]
    sample0 = _evaluate([0])
    padded = ranks[0]["padded"]
    assert padded["cls"]["top1"] == pytest.approx(400 / 8)
    assert padded["cls"]["top1"] != pytest.approx(single["cls"]["top1"])
    assert padded["seg"]["aAcc"] != pytest.approx(single["seg"]["aAcc"])
    assert padded["depth"]["abs_rel"] != pytest.approx(single["depth"]["abs_rel"])
    assert padded["depth_pixels"] == single["depth_pixels"] + sample0["depth_pixels"]
    assert sum(map(sum, padded["confmat"])) == sum(map(sum, single["confmat"])) + sum(
        map(sum, sample0["confmat"])
    )
