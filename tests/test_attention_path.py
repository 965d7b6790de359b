"""The attention kernel switch: both kernels compute the same function; 'auto' follows the device and precision."""

import pytest
import torch

from attent_vision.models import MaskingConfig, build_pretrain_multimae
from attent_vision.models.attention import (
    CPU_FUSED,
    set_fused_attention,
    use_fused_attention,
)


def test_fused_and_math_attention_give_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    net = build_pretrain_multimae(
        size="micro",
        image_size=32,
        patch_size=8,
        semseg_num_classes=5,
        masking=MaskingConfig(num_encoded_tokens=12),
    )
    x = {
        "rgb": torch.randn(2, 3, 32, 32),
        "depth": torch.randn(2, 1, 32, 32),
        "semseg": torch.randint(0, 5, (2, 8, 8)),
    }
    seeds = torch.tensor([3, 4])
    results = []
    for fused in (True, False):
        assert set_fused_attention(net, fused) > 0
        net.zero_grad()
        preds, _ = net(x, seeds)
        sum(p.float().square().mean() for p in preds.values()).backward()
        results.append(
            (
                {k: v.detach() for k, v in preds.items()},
                [p.grad.clone() for p in net.parameters() if p.grad is not None],
            )
        )
    (out_a, grad_a), (out_b, grad_b) = results
    for task in out_a:
        torch.testing.assert_close(out_a[task], out_b[task], rtol=1e-4, atol=1e-5)
    for a, b in zip(grad_a, grad_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    layers = [m for m in net.modules() if hasattr(m, "fused_attn")]
    assert any(type(m).__name__ == "CrossAttention" for m in layers)  # the decoders switch too
    assert all(m.fused_attn is False for m in layers)


def test_auto_picks_fused_on_gpus_and_the_measured_kernel_on_cpus():
    assert use_fused_attention("auto", device_type="cuda", precision="bf16-mixed") is True
    assert use_fused_attention("auto", device_type="cpu", precision="32-true") is CPU_FUSED["fp32"]
    assert use_fused_attention("auto", device_type="cpu", precision="bf16-mixed") is CPU_FUSED["bf16"]
    assert use_fused_attention("math", device_type="cuda", precision="bf16-mixed") is False
    with pytest.raises(ValueError, match="attention must be 'auto', 'fused' or 'math'"):
        use_fused_attention("flash", device_type="cpu", precision="32-true")
