"""Our MultiMAE pretraining step against the reference MultiMAE's (EPFL-VILAB/MultiMAE), side by side on CPU.

    python bench/vs_reference.py --reference-dir ~/src/MultiMAE
    python bench/vs_reference.py --reference-dir ~/src/MultiMAE --precisions bf16 --rounds 9 --same-masks
    python bench/vs_reference.py --reference-dir ~/src/MultiMAE --encoder config --model tiny --batch 8

``--reference-dir`` is a local checkout of https://github.com/EPFL-VILAB/MultiMAE (the folder that holds
``multimae/multimae.py``); its code is imported from there and never copied into this repository. Only the
``multimae`` package is used: ``multimae.py``, ``multimae_utils.py``, ``input_adapters.py``,
``output_adapters.py``, ``output_adapter_utils.py`` and ``criterion.py``.

Both models get the same geometry: our ``--model`` config (default micro: 64 px, patch 8, its decoders and token
budget) with the encoder width/depth/heads of ``--encoder`` (default 192:4:3, the setting of the measurement on
a Xeon with AMX, docs/benchmarks.md section 8; ``config`` keeps the model size's own), the same rgb/depth/semseg inputs and outputs plus the extra
``norm_rgb`` output, the same semseg classes, one global token, and the same number of encoded tokens. The
reference is built as its ``pretrain_multimae_*`` builders build it, with these dimensions.

A step, on both sides, is what a training loop runs per batch: truncated depth standardisation, the masked
forward (each model drawing its own masks as in its training step: ours from per-sample seeds, the reference
from the global RNG; ``--same-masks`` feeds the reference the masks ours drew, drawn outside its timed step), the
four pretraining losses (rgb MSE, depth L1, semseg cross-entropy, norm-pix rgb MSE; masked tokens only), their
sum, backward and an AdamW step (same hyper-parameters on both; ours with our config's fused kernel, the
reference with torch's default CPU implementation as its ``create_optimizer`` builds it; ``--default-adamw`` gives
ours that one too). Logging, the reference's ``.item()`` calls and its NativeScaler grad norm, and Lightning's
loop are not part of either step. ``--precisions``: fp32, or bf16
under ``torch.autocast("cpu")`` (semseg decoder in fp32 on both, as both recipes ask). Ours runs with fused SDPA
attention and with the explicit-softmax (math) kernel; the reference has only the explicit one.

Rounds are interleaved: after warm-up, every round times ``--steps`` steps of each variant in turn (the order
rotates each round), and each variant's ms/step is the median over rounds. ``speed vs reference`` is the
reference's median time divided by ours (> 1: ours is faster); ``per-round ratio`` is that ratio taken within
each round and then the median over rounds, which a machine whose speed drifts between rounds disturbs less. Each
row also splits its step into the forward (masks, network, losses), the backward and the optimizer step
(``--profile`` adds the operators' time shares). Prints a JSON line per row and a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from throughput import CLASSES, device_name, make_batch  # noqa: E402  (bench/ is not a package)

EXPECTED = "a local checkout of https://github.com/EPFL-VILAB/MultiMAE (the folder that contains multimae/multimae.py)"


# ---------------------------------------------------------------------------------------------- the reference


@contextlib.contextmanager
def _stub_reference_utils() -> Iterator[None]:
    """Shim 1: ``multimae/multimae.py`` does ``from utils.registry import register_model``. In a checkout, that
    runs the repository's ``utils/__init__.py``, which imports every training utility, among them
    ``torch._six`` (removed in torch 2.0) and wandb. The benchmark needs none of them: ``register_model`` only
    records the ``pretrain_multimae_*`` builders in a name table for ``create_model``. So, while the package
    imports, ``utils`` and ``utils.registry`` are stand-ins whose ``register_model`` returns the function
    unchanged; the modules they replaced (if any) are put back afterwards."""
    saved = {name: sys.modules.get(name) for name in ("utils", "utils.registry")}
    package = types.ModuleType("utils")
    package.__path__ = []  # a package, so that `utils.registry` resolves from sys.modules
    registry = types.ModuleType("utils.registry")
    registry.register_model = lambda fn: fn
    package.registry = registry
    sys.modules.update({"utils": package, "utils.registry": registry})
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _patch_cuda_autocast_off() -> None:
    """Shim 2: the reference runs its ``fp32_output_adapters`` (semseg) inside
    ``torch.cuda.amp.autocast(enabled=False)``, which only switches off CUDA autocast: under CPU autocast its
    semseg decoder would stay in bf16 while ours runs in fp32, as both recipes intend. Here a disabled
    ``torch.cuda.amp.autocast`` also disables CPU autocast (this process only; this repository never calls it),
    and torch's FutureWarning for that deprecated API goes away with it."""
    original = torch.cuda.amp.autocast

    def autocast(enabled: bool = True, dtype: torch.dtype = torch.float16, cache_enabled: bool = True) -> Any:
        if enabled:
            return original(enabled=True, dtype=dtype, cache_enabled=cache_enabled)
        return torch.autocast("cpu", enabled=False)

    torch.cuda.amp.autocast = autocast


def import_reference(reference_dir: Path) -> types.SimpleNamespace:
    """Imports the reference's ``multimae`` package from ``reference_dir``; exits with a message if it is not
    there or does not import."""
    if not (reference_dir / "multimae" / "multimae.py").is_file():
        sys.exit(f"--reference-dir {reference_dir}: no multimae/multimae.py there; expected {EXPECTED}.")
    sys.path.insert(0, str(reference_dir))
    try:
        with _stub_reference_utils(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names = {}
            for module, attrs in [
                ("multimae.multimae", ["MultiMAE"]),
                ("multimae.input_adapters", ["PatchedInputAdapter", "SemSegInputAdapter"]),
                ("multimae.output_adapters", ["SpatialOutputAdapter"]),
                ("multimae.criterion", ["MaskedCrossEntropyLoss", "MaskedL1Loss", "MaskedMSELoss"]),
            ]:
                imported = importlib.import_module(module)
                names.update({a: getattr(imported, a) for a in attrs})
    except (ImportError, AttributeError) as error:
        sys.exit(
            f"--reference-dir {reference_dir}: could not import the reference ({error!r}); expected {EXPECTED}."
        )
    finally:
        # The package stays imported; the checkout's other top-level names (utils, tools, ...) must not shadow
        # anything imported later.
        sys.path.remove(str(reference_dir))
    _patch_cuda_autocast_off()
    return types.SimpleNamespace(**names)


def build_reference(ref: types.SimpleNamespace, geometry: dict[str, Any]) -> nn.Module:
    """The reference pretraining MultiMAE with our geometry, as ``pretrain_multimae_base`` and the reference's
    ``get_model`` build it (sincos positional embeddings, task queries, cross-attention decoders with the input
    domains as context, an extra ``norm_rgb`` decoder on rgb queries), the encoder dims set explicitly."""
    with warnings.catch_warnings():
        # torch.meshgrid's indexing warning, from the reference's sincos tables
        warnings.simplefilter("ignore")
        return _reference_model(ref, geometry)


def _reference_model(ref: types.SimpleNamespace, g: dict[str, Any]) -> nn.Module:
    from attent_vision.data.modalities import MODALITIES, NORM_PIX_TASK

    common = dict(patch_size_full=g["patch_size"], image_size=g["image_size"])
    inputs = {}
    for domain in g["in_domains"]:
        if MODALITIES[domain].class_ids:
            inputs[domain] = ref.SemSegInputAdapter(
                num_classes=g["num_classes"],
                stride_level=g["semseg_stride"],
                dim_class_emb=64,
                interpolate_class_emb=False,
                **common,
            )
        else:
            channels = MODALITIES[domain].channels
            inputs[domain] = ref.PatchedInputAdapter(num_channels=channels, stride_level=1, **common)

    def decoder(domain: str) -> nn.Module:
        class_ids = MODALITIES[domain].class_ids
        return ref.SpatialOutputAdapter(
            num_channels=g["num_classes"] if class_ids else MODALITIES[domain].channels,
            stride_level=g["semseg_stride"] if class_ids else 1,
            dim_tokens=g["decoder_dim"],
            depth=g["decoder_depth"],
            num_heads=g["decoder_num_heads"],
            use_task_queries=True,
            task=domain,
            context_tasks=list(g["in_domains"]),
            use_xattn=True,
            **common,
        )

    outputs = {domain: decoder(domain) for domain in g["out_domains"]}
    if NORM_PIX_TASK in g["output_tasks"]:
        outputs[NORM_PIX_TASK] = decoder("rgb")
    return ref.MultiMAE(
        input_adapters=inputs,
        output_adapters=outputs,
        num_global_tokens=g["num_global_tokens"],
        dim_tokens=g["dim"],
        depth=g["depth"],
        num_heads=g["num_heads"],
        mlp_ratio=4,
        qkv_bias=True,
        drop_path_rate=g["drop_path_rate"],
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


def reference_losses(ref: types.SimpleNamespace, geometry: dict[str, Any]) -> dict[str, nn.Module]:
    """The reference recipe's losses (its DOMAIN_CONF, plus the norm-pix MSE on rgb for ``norm_rgb``)."""
    from attent_vision.data.modalities import NORM_PIX_TASK

    p, stride = geometry["patch_size"], geometry["semseg_stride"]
    losses = {
        "rgb": ref.MaskedMSELoss(patch_size=p, stride=1),
        "depth": ref.MaskedL1Loss(patch_size=p, stride=1),
        "semseg": ref.MaskedCrossEntropyLoss(patch_size=p, stride=stride),
        NORM_PIX_TASK: ref.MaskedMSELoss(patch_size=p, stride=1, norm_pix=True),
    }
    return {task: losses[task] for task in geometry["output_tasks"]}


def reference_depth_standardize(depth: Tensor) -> Tensor:
    """The reference training loop's truncated depth standardisation (per sample, central 80 % of the values)."""
    flat = torch.sort(depth.flatten(1), dim=1)[0]
    kept = flat[:, int(0.1 * flat.shape[1]) : int(0.9 * flat.shape[1])]
    return (depth - kept.mean(dim=1)[:, None, None, None]) / torch.sqrt(
        kept.var(dim=1)[:, None, None, None] + 1e-6
    )


# ------------------------------------------------------------------------------------------------------- ours


def build_ours(
    model: str, encoder: str, image_size: int | None, overrides: list[str]
) -> tuple[nn.Module, Any, str]:
    """Our MultiMAEPretrainModule from conf/ (as ``python train.py model=<model>`` builds it), with the encoder
    dims of ``encoder`` ("DIM:DEPTH:HEADS", or "config" for the model size's own). Returns (module, cfg, size)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import attent_vision.config  # noqa: F401  (registers the config resolvers)
    from attent_vision.models.builders import MODEL_SIZES

    extra = [f"data.input_size={image_size}"] if image_size else []
    extra.append(f"data.num_classes={CLASSES.get(model, 133)}")  # as bench/throughput.py: micro's data has 8
    size = None
    if encoder != "config":
        dim, depth, heads = (int(v) for v in encoder.split(":"))
        # No preset has these dims: register one in this process's size table (the builder looks sizes up there).
        size = f"bench_{dim}x{depth}x{heads}"
        MODEL_SIZES[size] = {"dim_tokens": dim, "depth": depth, "num_heads": heads}
        extra.append(f"model.net.size={size}")
    from attent_vision.config import PRIMARY_CONFIG_DIRS

    with initialize_config_dir(config_dir=str(PRIMARY_CONFIG_DIRS["train"]), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", *extra, *overrides])
    return instantiate(cfg.model), cfg, size or cfg.model.net.size


def geometry_of(module: nn.Module, cfg: Any) -> dict[str, Any]:
    """The shapes both models are built with, read from our composed config and network."""
    from attent_vision.models.builders import MODEL_SIZES

    net, ncfg = module.net, cfg.model.net
    masking = net.masking
    alphas = masking.alphas
    return {
        "dim": MODEL_SIZES[ncfg.size]["dim_tokens"],
        "depth": MODEL_SIZES[ncfg.size]["depth"],
        "num_heads": MODEL_SIZES[ncfg.size]["num_heads"],
        "image_size": int(cfg.data.input_size),
        "patch_size": int(ncfg.patch_size),
        "semseg_stride": int(ncfg.semseg_stride),
        "num_classes": int(cfg.data.num_classes),
        "in_domains": list(net.input_adapters),
        "out_domains": [t for t in net.output_adapters if t in list(ncfg.out_domains)],
        "output_tasks": list(module.losses),
        "decoder_dim": int(ncfg.decoder_dim),
        "decoder_depth": int(ncfg.decoder_depth),
        "decoder_num_heads": int(ncfg.decoder_num_heads),
        "num_global_tokens": int(ncfg.num_global_tokens),
        "drop_path_rate": float(ncfg.drop_path_rate),
        "num_encoded_tokens": int(masking.num_encoded_tokens),
        # The reference expands a float alpha only (an int would reach Dirichlet as a bare number).
        "alphas": float(alphas) if isinstance(alphas, int | float) else list(alphas),
        "sample_tasks_uniformly": bool(masking.sample_tasks_uniformly),
        "fp32_output_adapters": list(net.fp32_output_adapters),
        "tokens_per_task": (int(cfg.data.input_size) // int(ncfg.patch_size)) ** 2,
    }


# ------------------------------------------------------------------------------------------------------ steps


def make_optimizer(
    model: nn.Module, factory: Callable[..., torch.optim.Optimizer] | None = None
) -> torch.optim.Optimizer:
    """AdamW with the recipes' betas, eps and decay, one group on both sides. ``factory`` is our config's optimizer
    (fused AdamW); without it, torch's default CPU AdamW, the per-parameter loop, as the reference's
    ``create_optimizer`` builds it."""
    params = [p for p in model.parameters() if p.requires_grad]
    if factory is not None:
        return factory(params, lr=1e-4, weight_decay=0.05)
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)


def our_step(module: nn.Module, optimizer: torch.optim.Optimizer, autocast: Callable[[], Any]) -> Callable:
    """One step of ``MultiMAEPretrainModule.training_step`` (its loss reduction and task balancing; without the
    logging and the non-finite check) plus backward and the optimizer step, as Lightning runs them."""
    from attent_vision.lightning.pretrain import weighted_task_loss

    def step(batch: dict[str, Tensor], masks: Any, parts: dict[str, float]) -> Tensor:
        start = time.perf_counter()
        with autocast():
            losses = module.sample_losses(batch, mask_seeds=module.train_mask_seeds(batch["index"]))
            task_losses = {task: weighted_task_loss(loss, None) for task, loss in losses.items()}
            loss = torch.stack(list(module.task_balancer(task_losses).values())).sum()
        forward_done = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward_done = time.perf_counter()
        optimizer.step()
        record_parts(parts, start, forward_done, backward_done)
        return loss.detach()

    return step


def reference_step(
    model: nn.Module,
    losses: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    autocast: Callable[[], Any],
    geometry: dict[str, Any],
) -> Callable:
    """One iteration of the reference's ``train_one_epoch`` (task balancer 'none'), without its logging."""
    in_domains = geometry["in_domains"]

    def step(batch: dict[str, Tensor], masks: Any, parts: dict[str, float]) -> Tensor:
        start = time.perf_counter()
        tasks = {task: tensor for task, tensor in batch.items() if task != "index"}
        if "depth" in tasks:
            tasks["depth"] = reference_depth_standardize(tasks["depth"])
        inputs = {task: tensor for task, tensor in tasks.items() if task in in_domains}
        if masks is not None:  # --same-masks: the reference's own mask drawing returns ours instead
            model.generate_random_masks = lambda *args, **kwargs: (dict(masks.task_masks), *masks[1:])
        with autocast():
            preds, task_masks = model(
                inputs,
                num_encoded_tokens=geometry["num_encoded_tokens"],
                alphas=geometry["alphas"],
                sample_tasks_uniformly=geometry["sample_tasks_uniformly"],
                fp32_output_adapters=geometry["fp32_output_adapters"],
            )
            if "norm_rgb" in preds:
                tasks["norm_rgb"] = tasks["rgb"]
                task_masks["norm_rgb"] = task_masks.get("rgb", None)
            task_losses = {
                task: losses[task](preds[task].float(), tasks[task], mask=task_masks.get(task, None))
                for task in preds
            }
            loss = sum(task_losses.values())
        forward_done = time.perf_counter()
        optimizer.zero_grad()
        loss.backward()
        backward_done = time.perf_counter()
        optimizer.step()
        record_parts(parts, start, forward_done, backward_done)
        return loss.detach()

    return step


# ---------------------------------------------------------------------------------------------------- timing


PARTS = ("forward", "backward", "optimizer")


def record_parts(parts: dict[str, float], start: float, forward_done: float, backward_done: float) -> None:
    """Adds one step's seconds in the forward (masks, network, losses), backward and optimizer step."""
    end = time.perf_counter()
    for part, seconds in zip(
        PARTS, (forward_done - start, backward_done - forward_done, end - backward_done)
    ):
        parts[part] = parts.get(part, 0.0) + seconds


def time_steps(
    step: Callable, batches: list[dict[str, Tensor]], masks: list[Any], steps: int
) -> tuple[float, float, dict[str, float]]:
    """Seconds per step over ``steps`` steps (cycling through the batches), the last step's loss and the seconds
    per step of each part."""
    parts: dict[str, float] = {}
    start = time.perf_counter()
    for k in range(steps):
        loss = step(batches[k % len(batches)], masks[k % len(masks)] if masks else None, parts)
    return (time.perf_counter() - start) / steps, float(loss), {p: t / steps for p, t in parts.items()}


def operator_shares(work: Callable[[], Any], top: int = 8) -> str:
    """The ``top`` operators by self CPU time while ``work`` runs, as shares of all operators' self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        work()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return ", ".join(f"{e.key} {e.self_cpu_time_total / total:.1%}" for e in events[:top])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference-dir", type=Path, required=True, help=f"{EXPECTED}")
    parser.add_argument(
        "--model", default="micro", help="our model config (attent_vision/conf/pretrain/model), default micro"
    )
    parser.add_argument(
        "--encoder",
        default="192:4:3",
        help="encoder DIM:DEPTH:HEADS of both models, or 'config' (default 192:4:3)",
    )
    parser.add_argument("--image-size", type=int, help="default: the data config's input_size (64)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the rounds")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--same-masks",
        action="store_true",
        help="feed the reference the masks ours draws (drawn outside its timed step) instead of its own",
    )
    parser.add_argument(
        "--default-adamw",
        action="store_true",
        help="give ours torch's default CPU AdamW too, instead of our config's fused one",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, profile 2 steps of each variant (torch.profiler) and print its operators' time shares",
    )
    parser.add_argument("--json", type=Path, help="also write every row to this file")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides of our config")
    args = parser.parse_args()

    ref = import_reference(args.reference_dir.expanduser().resolve())
    if args.threads:
        torch.set_num_threads(args.threads)
    from attent_vision.models.attention import set_fused_attention
    from attent_vision.models.masking import generate_random_masks

    torch.manual_seed(0)
    module, cfg, size = build_ours(args.model, args.encoder, args.image_size, args.overrides)
    g = geometry_of(module, cfg)
    torch.manual_seed(0)
    reference = build_reference(ref, g)
    ref_losses = reference_losses(ref, g)
    module.train()
    reference.train()

    def count(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    # Distinct sample indices per step, so ours draws new seeded masks each step as in training.
    n = max(args.steps, args.warmup, 1)
    batches = []
    for k in range(n):
        batch = make_batch(args.batch, g["image_size"], g["num_classes"], g["semseg_stride"], "cpu")
        batch["index"] = batch["index"] + k * args.batch
        batches.append(batch)
    masks = []
    if args.same_masks:
        counts = {task: g["tokens_per_task"] for task in g["in_domains"]}
        m = module.net.masking
        masks = [
            generate_random_masks(
                counts,
                batch_size=args.batch,
                num_encoded_tokens=m.num_encoded_tokens,
                alphas=m.alphas,
                sample_tasks_uniformly=m.sample_tasks_uniformly,
                tie_break_noise=m.tie_break_noise,
                mask_seeds=module.train_mask_seeds(b["index"]),
            )
            for b in batches
        ]

    def autocast_for(precision: str) -> Callable[[], Any]:
        if precision == "bf16":
            return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext

    ours_optimizer = make_optimizer(module, None if args.default_adamw else module.optimizer_factory)
    ref_optimizer = make_optimizer(reference)
    variants = []  # (precision, model, attention, step, masks)
    for precision in args.precisions:
        autocast = autocast_for(precision)
        ref_run = reference_step(reference, ref_losses, ref_optimizer, autocast, g)
        variants.append((precision, "reference", "math", ref_run, masks))
        ours = our_step(module, ours_optimizer, autocast)
        variants += [(precision, "ours", "fused", ours, []), (precision, "ours", "math", ours, [])]

    def run(variant: tuple, steps: int) -> tuple[float, float, dict[str, float]]:
        _, model, attention, step, step_masks = variant
        if model == "ours":
            set_fused_attention(module, attention == "fused")
        return time_steps(step, batches, step_masks, steps)

    header = {
        "cpu": device_name("cpu"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "encoder_size": size,
        **{k: v for k, v in g.items() if k not in ("fp32_output_adapters",)},
        "fp32_output_adapters": g["fp32_output_adapters"],
        "batch": args.batch,
        "params_ours": count(module),
        "params_reference": count(reference),
        "masks": "reference draws ours" if args.same_masks else "each model draws its own",
        "optimizer_ours": "default AdamW" if args.default_adamw else "config (fused AdamW)",
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    print(json.dumps(header), flush=True)

    for variant in variants:
        if args.warmup:
            run(variant, args.warmup)
    times: dict[int, list[float]] = {i: [] for i in range(len(variants))}
    part_times: dict[int, dict[str, list[float]]] = {i: {p: [] for p in PARTS} for i in range(len(variants))}
    last_loss: dict[int, float] = {}
    for r in range(args.rounds):
        order = list(range(len(variants)))
        order = order[r % len(order) :] + order[: r % len(order)]  # rotate: no variant always runs first
        for i in order:
            seconds, last_loss[i], parts = run(variants[i], args.steps)
            times[i].append(seconds)
            for part, part_seconds in parts.items():
                part_times[i][part].append(part_seconds)

    rows = []
    medians = {i: statistics.median(t) for i, t in times.items()}
    for i, (precision, model, attention, _, _) in enumerate(variants):
        ref_index = next(j for j, v in enumerate(variants) if v[0] == precision and v[1] == "reference")
        row = {
            "precision": precision,
            "model": model,
            "attention": attention,
            "ms_per_step": round(1000 * medians[i], 2),
            "ms_per_step_min": round(1000 * min(times[i]), 2),
            "ms_per_step_rounds": [round(1000 * t, 2) for t in times[i]],
            "images_per_s": round(args.batch / medians[i], 2),
            "speed_vs_reference": round(medians[ref_index] / medians[i], 3),
            # the same ratio within each round, then the median: robust to the machine's speed drifting
            "speed_vs_reference_paired": round(
                statistics.median(r / o for r, o in zip(times[ref_index], times[i], strict=True)), 3
            ),
            **{f"{p}_ms": round(1000 * statistics.median(part_times[i][p]), 2) for p in PARTS},
            "last_loss": round(last_loss[i], 4),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"setup": header, "rows": rows}, indent=1))
    if args.profile:
        for variant in variants:
            print(
                f"\n{variant[0]} {variant[1]} ({variant[2]} attention): {operator_shares(partial(run, variant, 2))}"
            )

    print(
        f"\n{header['cpu']}, {header['threads']} threads, torch {header['torch']}; encoder {g['dim']}/{g['depth']}/"
        f"{g['num_heads']}, {g['image_size']} px, patch {g['patch_size']}, {g['num_encoded_tokens']} of "
        f"{g['tokens_per_task'] * len(g['in_domains'])} tokens encoded, batch {args.batch}; masks: {header['masks']}"
        "\n\n| precision | model | attention | ms/step (median) | ms/step (min) | images/s | speed vs reference | "
        "per-round ratio (median) | forward / backward / optimizer ms |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['precision']} | {r['model']} | {r['attention']} | {r['ms_per_step']} | {r['ms_per_step_min']} | "
            f"{r['images_per_s']} | {r['speed_vs_reference']:.2f}x | {r['speed_vs_reference_paired']:.2f}x | "
            f"{r['forward_ms']:.0f} / {r['backward_ms']:.0f} / {r['optimizer_ms']:.0f} |"
        )


if __name__ == "__main__":
    main()
