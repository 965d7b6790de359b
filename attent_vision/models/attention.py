"""Which attention kernel the transformer blocks use: PyTorch's fused ``scaled_dot_product_attention`` or the
explicit ``softmax(q kᵀ / √d) v`` (timm's ``fused_attn = False`` path). Both compute the same function.

The faster one depends on the device and the precision. bench/throughput.py (``--attn fused math``) and
bench/vs_reference.py measure both; :data:`CPU_FUSED` records the choice for CPUs, and GPUs always use the fused
kernel (flash / memory-efficient attention).
"""

from __future__ import annotations

import logging
from typing import Literal

from torch import nn

log = logging.getLogger(__name__)

AttentionPath = Literal["auto", "fused", "math"]

# fp32: fused, as fast as the explicit kernel or faster (docs/benchmarks.md, bench/vs_reference.py on a 2-core AMD
# EPYC: 545 vs 544 ms/step). bf16: the explicit kernel — bf16 autocast is the CPU default only where the CPU has
# native bf16, and there the fused kernel measured 0.63x the reference step against 0.95x for the explicit one
# (measured on a 2-core Xeon with AMX, docs/benchmarks.md section 8); on CPUs that only emulate bf16 the fused kernel was 9% faster (7074 vs 7682 ms/step), but
# bf16 is not their default. Override with model.attention=fused|math.
CPU_FUSED = {"fp32": True, "bf16": False, "fp16": False}


def precision_kind(precision: str) -> str:
    """'fp32', 'bf16' or 'fp16' for a Lightning precision string ('32-true', 'bf16-mixed', '16-mixed', ...)."""
    text = str(precision)
    if "bf16" in text:
        return "bf16"
    return "fp16" if text.startswith("16") else "fp32"


def use_fused_attention(path: AttentionPath, *, device_type: str, precision: str) -> bool:
    """Resolves ``path`` ('auto' picks per device and precision, see :data:`CPU_FUSED`)."""
    if path not in ("auto", "fused", "math"):
        raise ValueError(f"attention must be 'auto', 'fused' or 'math', got {path!r}")
    if path != "auto":
        return path == "fused"
    return True if device_type != "cpu" else CPU_FUSED[precision_kind(precision)]


def set_fused_attention(module: nn.Module, fused: bool) -> int:
    """Sets ``fused_attn`` on every attention layer of ``module`` (timm's Attention and this package's
    CrossAttention); returns how many layers it set."""
    layers = [m for m in module.modules() if hasattr(m, "fused_attn")]
    for layer in layers:
        layer.fused_attn = fused
    return len(layers)


def configure_attention(net: nn.Module, path: AttentionPath, *, device_type: str, precision: str) -> bool:
    """Sets every attention layer of ``net`` to the kernel ``path`` resolves to; returns True if fused."""
    fused = use_fused_attention(path, device_type=device_type, precision=precision)
    layers = set_fused_attention(net, fused)
    log.info(
        "attention: %s kernel in %d layers (attention=%s, %s, %s)",
        "fused SDPA" if fused else "explicit softmax",
        layers,
        path,
        device_type,
        precision_kind(precision),
    )
    return fused
