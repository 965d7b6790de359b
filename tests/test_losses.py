"""Per-sample masked losses, batch reduction, depth standardisation and task balancers."""

import math

import pytest
import torch

from attent_vision.models.losses import (
    MaskedCrossEntropyLoss,
    MaskedL1Loss,
    MaskedMSELoss,
    SampleLoss,
    reduce_batch,
    truncated_depth_standardize,
    upsample_token_mask,
)
from attent_vision.models.task_balancing import NoTaskBalancer, UncertaintyTaskBalancer


def _target_two_patches() -> torch.Tensor:
    # (B=2, C=1, H=2, W=4): patch size 2 -> tokens [left 2x2, right 2x2] per sample.
    return torch.tensor(
        [
            [[[1.0, 2.0, 5.0, 5.0], [3.0, 4.0, 5.0, 5.0]]],
            [[[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]],
        ]
    )


def test_upsample_token_mask_is_nearest_blocks():
    mask = torch.tensor([[1, 0, 0, 1]])
    up = upsample_token_mask(mask, (4, 4), scale=2)
    expected = torch.tensor([[[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]]).float()
    assert torch.equal(up, expected)
    with pytest.raises(ValueError):
        upsample_token_mask(mask, (4, 6), scale=2)


def test_mse_per_sample_hand_values_and_zero_mask():
    target = _target_two_patches()
    pred = torch.zeros_like(target)
    mask = torch.tensor([[1, 0], [0, 0]])  # sample 0: left patch masked; sample 1: nothing masked
    out = MaskedMSELoss(patch_size=2, stride=1)(pred, target, mask)
    assert isinstance(out, SampleLoss)
    assert out.value.dtype == torch.float32 and out.value.shape == (2,)
    assert torch.allclose(out.value, torch.tensor([(1 + 4 + 9 + 16) / 4, 0.0]))
    assert out.count.tolist() == [4, 0]
    assert not torch.isnan(out.value).any()


def test_mse_averages_channels_and_without_mask_counts_all_pixels():
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 3.0)])[
        None
    ]  # channel means (1 + 9) / 2
    out = MaskedMSELoss(patch_size=2)(pred, target, torch.tensor([[1]]))
    assert torch.allclose(out.value, torch.tensor([5.0]))
    no_mask = MaskedMSELoss(patch_size=2)(pred, target)
    assert torch.allclose(no_mask.value, torch.tensor([5.0])) and no_mask.count.tolist() == [4]


def test_mse_norm_pix_standardises_each_patch_with_unbiased_var():
    # One 2x2 patch with values 1..4: mean 2.5, unbiased var 5/3.
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    out = MaskedMSELoss(patch_size=2, norm_pix=True)(torch.zeros_like(target), target, torch.tensor([[1]]))
    var = 5.0 / 3.0
    expected = sum((v - 2.5) ** 2 for v in (1, 2, 3, 4)) / (var + 1e-6) / 4  # = 0.75 * var / (var + eps)
    assert out.value.item() == pytest.approx(expected, rel=1e-5)


def test_norm_pix_patch_spans_channels_p_p_c():
    # Channel 0 all 0, channel 1 all 2: per patch (p p c) mean 1 and unbiased var 8/7 -> every value ±1/sqrt(8/7).
    # Per-channel normalisation would give 0 instead.
    target = torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)], dim=1)
    out = MaskedMSELoss(patch_size=2, norm_pix=True)(torch.zeros_like(target), target, torch.tensor([[1]]))
    assert out.value.item() == pytest.approx(1.0 / (8.0 / 7.0 + 1e-6), rel=1e-5)


def test_l1_per_sample_hand_values_with_stride():
    # stride 2 with patch_size 4 -> loss patch 2x2, as for a quarter-resolution task.
    target = _target_two_patches()
    pred = torch.ones_like(target)
    mask = torch.tensor([[0, 1], [1, 1]])
    out = MaskedL1Loss(patch_size=4, stride=2)(pred, target, mask)
    assert torch.allclose(out.value, torch.tensor([4.0, (0 + 0 + 0 + 0 + 1 + 1 + 1 + 1) / 8]))
    assert out.count.tolist() == [4, 8]


def test_cross_entropy_hand_values_and_ignore_index():
    # Logits (B=1, K=2, H=2, W=2), labels 0 everywhere except one ignored pixel.
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0, 0, 0] = 2.0  # pixel (0,0): CE = log(1 + e^-2); other pixels: log 2
    labels = torch.tensor([[[0, 0], [0, 255]]])
    loss_fn = MaskedCrossEntropyLoss(patch_size=1, stride=1, ignore_index=255)
    out = loss_fn(logits, labels, torch.tensor([[1, 1, 1, 1]]))
    expected = (
        math.log(1 + math.exp(-2)) + 2 * math.log(2)
    ) / 3  # the ignored pixel is not in the denominator
    assert out.value.item() == pytest.approx(expected, rel=1e-6)
    assert out.count.tolist() == [3]
    partial = loss_fn(logits, labels, torch.tensor([[0, 1, 0, 1]]))  # only (0,1) and the ignored (1,1)
    assert partial.value.item() == pytest.approx(math.log(2), rel=1e-6) and partial.count.tolist() == [1]
    empty = loss_fn(logits, labels, torch.tensor([[0, 0, 0, 1]]))
    assert empty.value.tolist() == [0.0] and empty.count.tolist() == [0]


def test_cross_entropy_label_smoothing_changes_value():
    logits = torch.tensor([[[[3.0]], [[0.0]]]])  # (1, 2, 1, 1)
    labels = torch.tensor([[[0]]])
    plain = MaskedCrossEntropyLoss(patch_size=1)(logits, labels).value.item()
    smooth = MaskedCrossEntropyLoss(patch_size=1, label_smoothing=0.2)(logits, labels).value.item()
    log_p = torch.log_softmax(logits[0, :, 0, 0], 0)
    assert plain == pytest.approx(-log_p[0].item(), rel=1e-6)
    assert smooth == pytest.approx(-(0.9 * log_p[0] + 0.1 * log_p[1]).item(), rel=1e-6)


def test_reduce_batch_matches_nanmean_semantics():
    torch.manual_seed(0)
    pred, target = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    mask = (torch.rand(5, 4) > 0.5).long()
    mask[2] = 0  # a sample with nothing masked
    mask[0, 0] = 1
    out = MaskedMSELoss(patch_size=2)(pred, target, mask)
    # Reference: per-sample Σ/Σ (NaN for empty samples), then nanmean over the batch.
    loss = ((pred - target) ** 2).mean(1)
    pix = upsample_token_mask(mask, (4, 4), 2)
    reference = ((loss * pix).flatten(1).sum(1) / pix.flatten(1).sum(1)).nanmean()
    assert reduce_batch(out).item() == pytest.approx(reference.item(), rel=1e-6)
    assert reduce_batch(SampleLoss(torch.tensor([1.0, 3.0, 0.0]), torch.tensor([4, 2, 0]))).item() == 2.0
    none = reduce_batch(SampleLoss(torch.zeros(3), torch.zeros(3, dtype=torch.long)))
    assert none.item() == 0.0 and not torch.isnan(none)


def test_reduce_batch_gradient_skips_empty_samples():
    value = torch.tensor([1.0, 5.0], requires_grad=True)
    reduce_batch(SampleLoss(value, torch.tensor([3, 0]))).backward()
    assert value.grad.tolist() == [1.0, 0.0]


def test_truncated_depth_standardize_hand_example():
    # Sample 0: values 0..9 shuffled -> kept slice [1, 9) = 1..8, mean 4.5, unbiased var 6.
    values = torch.tensor([7.0, 2.0, 9.0, 0.0, 5.0, 1.0, 8.0, 3.0, 6.0, 4.0])
    depth = torch.stack([values, 10 * values]).view(2, 1, 2, 5)
    out = truncated_depth_standardize(depth)
    assert out.shape == depth.shape and out.dtype == depth.dtype
    assert torch.allclose(out[0].flatten(), (values - 4.5) / math.sqrt(6.0 + 1e-6))
    assert torch.allclose(
        out[1].flatten(), (10 * values - 45.0) / math.sqrt(600.0 + 1e-6)
    )  # per-sample stats


def test_no_task_balancer_is_identity():
    losses = {"rgb": torch.tensor(1.5), "depth": torch.tensor(0.0)}
    assert NoTaskBalancer()(losses) == losses


def test_uncertainty_balancer_math_and_zero_loss():
    balancer = UncertaintyTaskBalancer(["rgb", "depth", "semseg"])
    assert balancer.log_vars.tolist() == [0.0, 0.0, 0.0]
    with torch.no_grad():
        balancer.log_vars.copy_(torch.tensor([0.5, -1.0, 2.0]))
    # Reversed dict order: values are matched by name, not position.
    out = balancer({"semseg": torch.tensor(0.0), "depth": torch.tensor(3.0), "rgb": torch.tensor(2.0)})
    assert out["rgb"].item() == pytest.approx(math.exp(-0.5) * 2.0 + 0.5)
    assert out["depth"].item() == pytest.approx(math.exp(1.0) * 3.0 - 1.0)
    assert out["semseg"].item() == 0.0
    sum(out.values()).backward()
    grad = balancer.log_vars.grad
    assert grad[0].item() == pytest.approx(1 - math.exp(-0.5) * 2.0)  # d/ds (e^-s L + s) = 1 - e^-s L
    assert grad[2].item() == 0.0
    with pytest.raises(ValueError, match="unknown"):
        balancer({"normals": torch.tensor(1.0)})
