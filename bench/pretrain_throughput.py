"""Pretraining throughput (images/s) of MultiMAE training steps, fp32 against bf16 autocast, same invocation.

    python bench/pretrain_throughput.py                       # micro @64 batch 32 and base @224 batch 8
    python bench/pretrain_throughput.py --configs base:224:8 --steps 5

Each config runs forward + backward + AdamW step on random inputs of the real shapes (the data pipeline is not
timed). Prints a JSON line per measurement and a markdown table; ratios are within this one run.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch

from attent_vision.data.modalities import loss_target
from attent_vision.models import MaskingConfig, build_pretrain_multimae
from attent_vision.models.losses import default_loss, reduce_batch

PATCH = {"micro": 8}
ENCODED = {"micro": 32}
DECODER = {"micro": dict(decoder_dim=128, decoder_depth=1, decoder_num_heads=4)}


def make_batch(batch: int, size: int, classes: int) -> dict[str, torch.Tensor]:
    return {
        "rgb": torch.randn(batch, 3, size, size),
        "depth": torch.randn(batch, 1, size, size),
        "semseg": torch.randint(0, classes, (batch, size // 4, size // 4)),
    }


def measure(size_name: str, image_size: int, batch: int, *, bf16: bool, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    patch = PATCH.get(size_name, 16)
    classes = 8 if size_name == "micro" else 133
    tokens = 3 * (image_size // patch) ** 2
    net = build_pretrain_multimae(
        size=size_name,
        image_size=image_size,
        patch_size=patch,
        semseg_num_classes=classes,
        masking=MaskingConfig(num_encoded_tokens=ENCODED.get(size_name, tokens // 6)),
        **DECODER.get(size_name, {}),
    )
    losses = {
        task: default_loss(task, patch_size=patch, stride=adapter.stride_level)
        for task, adapter in net.output_adapters.items()
    }
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95))
    data = make_batch(batch, image_size, classes)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with autocast:
            preds, masks = net(data)  # semseg decodes in fp32 (the builder's default)
        total = 0
        for task, fn in losses.items():
            src = loss_target(task)
            total = total + reduce_batch(fn(preds[task].float(), data[src], masks[src]))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", nargs="+", default=["micro:64:32", "base:224:8"], help="size:image:batch"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for spec in args.configs:
        name, image, batch = spec.split(":")
        result = {
            "model": name,
            "image_size": int(image),
            "batch": int(batch),
            "threads": torch.get_num_threads(),
        }
        for mode in ("fp32", "bf16"):
            ips = measure(
                name, int(image), int(batch), bf16=mode == "bf16", steps=args.steps, warmup=args.warmup
            )
            result[f"{mode}_images_per_s"] = round(ips, 2)
        result["bf16_over_fp32"] = round(result["bf16_images_per_s"] / result["fp32_images_per_s"], 3)
        print(json.dumps(result), flush=True)
        rows.append(result)
    print("\n| model | image | batch | fp32 img/s | bf16 img/s | bf16/fp32 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['image_size']} | {r['batch']} | {r['fp32_images_per_s']} | "
            f"{r['bf16_images_per_s']} | {r['bf16_over_fp32']} |"
        )


if __name__ == "__main__":
    main()
