"""Pretraining throughput and peak memory: training step, scoring pass and data loader, on CPU and GPU.

    python bench/throughput.py                                  # every row this machine can run
    python bench/throughput.py --configs micro:64:32 --precisions fp32 --compile eager
    python bench/throughput.py --devices cuda --configs micro:64:256 base:224:64 --json out.json

Rows (each measured in its own subprocess, so peak memory and compile caches do not leak between rows):

* ``train``: forward + backward + AdamW step of the real MultiMAEPretrainModule (built from conf/ as
  `python train.py model=<size>` builds it), per-sample training masks drawn as in training, on random inputs of
  the real shapes; fp32 or bf16 autocast, eager or ``torch.compile``.
* ``score``: the teacher's scoring pass step (forward only, no grad, score masks seeded by index) at 4x the batch.
* ``masks``: drawing one training batch's per-sample masks alone (the part of a step that is not the network),
  counter-hashed on the device; ``masks_loop``: the same batch the earlier way, a CPU generator per sample.
* ``adamw_loop`` / ``adamw_foreach`` / ``adamw_fused``: one AdamW step over the model's parameters alone, in
  torch's three implementations (the per-parameter loop is torch's CPU default; the config uses the fused one).
* ``loader``: the default data loader alone (embedded data, its workers and transforms), images/s over an epoch.

Peak memory is the process's peak resident set on CPU (model, optimizer, activations and the Python/torch
runtime) and ``torch.cuda.max_memory_allocated`` on GPU. Prints a JSON line per row and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"micro": 8}  # semseg classes: the embedded data's 8 for micro, the reference's 133 otherwise


def build_module(size: str, image_size: int):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from attent_vision.config import PRIMARY_CONFIG_DIRS  # importing it registers the config resolvers

    with initialize_config_dir(config_dir=str(PRIMARY_CONFIG_DIRS["train"]), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"model={size}",
                f"data.input_size={image_size}",
                f"data.num_classes={CLASSES.get(size, 133)}",
            ],
        )
    return instantiate(cfg.model), cfg


def make_batch(batch: int, size: int, classes: int, stride: int, device: str):
    import torch

    return {
        "rgb": torch.randn(batch, 3, size, size, device=device),
        "depth": torch.rand(batch, 1, size, size, device=device) * 10,
        "semseg": torch.randint(0, classes, (batch, size // stride, size // stride), device=device),
        "index": torch.arange(batch, device=device),
    }


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def measure_model(row: dict, steps: int, warmup: int) -> dict:
    import torch

    from attent_vision.models.masking import generate_random_masks
    from attent_vision.seeds import item_seeds

    torch.manual_seed(0)
    device, kind = row["device"], row["kind"]
    module, cfg = build_module(row["model"], row["image_size"])
    module = module.to(device)
    batch_size = row["batch"] * (4 if kind == "score" else 1)  # the scorer's default batch is 4x
    row["batch"] = batch_size
    batch = make_batch(batch_size, row["image_size"], cfg.data.num_classes, cfg.data.semseg_stride, device)
    from attent_vision.models.attention import set_fused_attention

    # "math": the explicit softmax(q k^T) v of timm's Attention and our CrossAttention instead of fused SDPA
    set_fused_attention(module, row.get("attn", "fused") == "fused")
    if row["compile"] == "compile":
        module.net.compile()
    autocast = torch.autocast(device, dtype=torch.bfloat16) if row["precision"] == "bf16" else nullcontext()
    if kind.startswith("adamw_"):  # the optimizer step alone, in one of torch's implementations
        impl = kind.removeprefix("adamw_")
        optimizer = torch.optim.AdamW(
            module.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=impl == "foreach", fused=impl == "fused"
        )
        for param in module.parameters():
            param.grad = torch.randn_like(param)
    else:
        optimizer = module.optimizer_factory(module.parameters(), lr=1e-4)  # the config's (fused AdamW)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def train_step() -> None:
        with autocast:
            losses = module.sample_losses(batch, mask_seeds=module.train_mask_seeds(batch["index"]))
            loss = torch.stack([value.value.mean() for value in losses.values()]).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def score_step() -> None:
        with autocast:
            module.score_batch(batch, seed=0)

    patches = cfg.model.net.patch_size
    grid = (row["image_size"] // patches) ** 2
    num_tokens = {task: grid for task in module.net.input_adapters}

    def mask_step() -> None:
        masking = module.net.masking
        generate_random_masks(
            num_tokens,
            batch_size=batch_size,
            num_encoded_tokens=masking.num_encoded_tokens,
            alphas=masking.alphas,
            tie_break_noise=masking.tie_break_noise,
            mask_seeds=item_seeds("train_mask", 0, 0, index=batch["index"]),
            device=device,
        )
        sync(device)

    def mask_loop_step() -> None:  # the earlier way, for comparison: one CPU generator per sample, in a loop
        masking = module.net.masking
        seeds = item_seeds("train_mask", 0, 0, index=batch["index"]).tolist()
        keep = [
            generate_random_masks(
                num_tokens,
                batch_size=1,
                num_encoded_tokens=masking.num_encoded_tokens,
                alphas=masking.alphas,
                tie_break_noise=masking.tie_break_noise,
                generator=torch.Generator().manual_seed(seed),
            ).ids_keep
            for seed in seeds
        ]
        torch.cat(keep).to(device)
        sync(device)

    steps_by_kind = {
        "train": train_step,
        "score": score_step,
        "masks": mask_step,
        "masks_loop": mask_loop_step,
    }
    step = steps_by_kind.get(kind, optimizer.step)
    module.train(kind == "train")
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    row["warmup_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - start
    row["images_per_s"] = round(batch_size * steps / elapsed, 2)
    row["ms_per_step"] = round(1000 * elapsed / steps, 2)
    row["peak_memory_mb"] = round(peak_memory_mb(device), 1)
    return row


def measure_loader(row: dict, epochs: int) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from attent_vision.config import PRIMARY_CONFIG_DIRS  # importing it registers the config resolvers

    with initialize_config_dir(config_dir=str(PRIMARY_CONFIG_DIRS["train"]), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={ROOT}"])
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    images, start = 0, time.perf_counter()
    for _ in range(epochs):  # a new loader per epoch, as the teacher's reload does: worker start-up included
        for batch in datamodule.train_dataloader():
            images += batch["index"].shape[0]
    elapsed = time.perf_counter() - start
    row.update(
        batch=cfg.data.batch_size,
        image_size=cfg.data.input_size,
        num_workers=cfg.data.num_workers,
        images_per_s=round(images / elapsed, 2),
        ms_per_step=round(1000 * elapsed * cfg.data.batch_size / images, 2),
        peak_memory_mb=round(peak_memory_mb("cpu"), 1),
    )
    return row


def run_one(row: dict, args: argparse.Namespace) -> dict:
    """Measures ``row`` in a fresh interpreter; returns the row with its numbers (or its error)."""
    cmd = [sys.executable, __file__, "--one", json.dumps(row), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"gave up after {args.row_timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {**row, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


def plan_rows(args: argparse.Namespace) -> list[dict]:
    import torch

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for device in devices:
        configs = args.configs or (
            ["micro:64:256", "base:224:64"] if device == "cuda" else ["micro:64:32", "base:224:8"]
        )
        for spec in configs:
            size, image, batch = spec.split(":")
            base = {"device": device, "model": size, "image_size": int(image), "batch": int(batch)}
            for precision in args.precisions:
                for compiled in args.compile:
                    for attn in args.attn if compiled == "eager" else ["fused"]:
                        rows.append(
                            {
                                **base,
                                "kind": "train",
                                "precision": precision,
                                "compile": compiled,
                                "attn": attn,
                            }
                        )
                rows.append({**base, "kind": "score", "precision": precision, "compile": "eager"})
            rows.append({**base, "kind": "masks", "precision": "-", "compile": "eager"})
            for impl in ("loop", "foreach", "fused"):
                rows.append({**base, "kind": f"adamw_{impl}", "precision": "fp32", "compile": "eager"})
        for spec in args.mask_configs:  # a GPU-sized batch: is drawing masks negligible beside its step?
            size, image, batch = spec.split(":")
            base = {"device": device, "model": size, "image_size": int(image), "batch": int(batch)}
            rows.append({**base, "kind": "masks", "precision": "-", "compile": "eager"})
            rows.append({**base, "kind": "masks_loop", "precision": "-", "compile": "eager"})
    if "cpu" in devices:
        rows.append({"device": "cpu", "model": "-", "kind": "loader", "precision": "-", "compile": "-"})
    return rows


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{Path('/proc/cpuinfo').read_text().split('model name')[1].split(':')[1].splitlines()[0].strip()}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--devices", nargs="+", choices=["cpu", "cuda"], help="default: cpu, and cuda if present"
    )
    parser.add_argument("--configs", nargs="+", help="size:image:batch (default per device)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--compile", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    parser.add_argument(
        "--mask-configs",
        nargs="+",
        default=["base:224:256"],
        help="extra mask-drawing rows, size:image:batch",
    )
    parser.add_argument("--row-timeout", type=float, default=300, help="seconds before a row is given up")
    parser.add_argument(
        "--attn", nargs="+", default=["fused", "math"], choices=["fused", "math"], help="eager train rows"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (compilation happens here)"
    )
    parser.add_argument("--loader-epochs", type=int, default=2)
    parser.add_argument("--json", help="also write every row to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one row in this process
    args = parser.parse_args()
    if args.one:
        row = json.loads(args.one)
        import torch

        row["threads"] = torch.get_num_threads()
        row["device_name"] = device_name(row["device"])
        result = (
            measure_loader(row, args.loader_epochs)
            if row["kind"] == "loader"
            else measure_model(row, args.steps, args.warmup)
        )
        print(json.dumps(result), flush=True)
        return
    rows = []
    for row in plan_rows(args):
        result = run_one(row, args)
        print(json.dumps(result), flush=True)
        rows.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(
        "\n| device | row | model | image | batch | precision | compile | attention | images/s | ms/step | peak MB |"
        "\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        numbers = (
            f"{r['images_per_s']} | {r['ms_per_step']} | {r['peak_memory_mb']}"
            if "error" not in r
            else f"error: {r['error']} | | "
        )
        print(
            f"| {r.get('device_name', r['device'])} | {r['kind']} | {r['model']} | {r.get('image_size', '-')} | "
            f"{r.get('batch', '-')} | {r['precision']} | {r['compile']} | {r.get('attn', '-')} | {numbers} |"
        )


if __name__ == "__main__":
    main()
