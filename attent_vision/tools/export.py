"""Export a MultiMAE encoder for other libraries: ``python -m attent_vision.tools.export <source> --format timm
--out DIR``.

``--format timm`` writes the encoder's RGB path as a timm ``VisionTransformer`` in timm's Hugging Face hub layout
(``model.safetensors`` + ``config.json`` with ``architecture``, ``num_classes``, ``model_args`` and
``pretrained_cfg``, written by timm's own :func:`timm.models.save_for_hf`), so that::

    timm.create_model("local-dir:DIR", pretrained=True)

rebuilds it and loads the weights strictly; ``timm.models.push_to_hf_hub`` publishes the same files. The mapping:
MultiMAE's global token is timm's ``cls_token`` (more global tokens: ``reg_tokens``) with no position of its own
(``no_embed_class=True``), the fixed rgb sin-cos grid is ``pos_embed``, ``encoder.*`` is ``blocks.*``, and there is no
final norm (``final_norm=False``: MultiMAE has none) and no head (``num_classes=0``). The source is anything
``finetune.py``'s ``pretrained=`` takes: a run directory, a checkpoint file, a released name or a URL.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from attent_vision.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from attent_vision.models.builders import MODEL_SIZES
from attent_vision.models.checkpoint import parse_checkpoint, read_checkpoint, resolve_checkpoint
from attent_vision.models.checkpoint_keys import multimae_to_timm_vit
from attent_vision.models.released import (
    RELEASE_LICENCE,
    RELEASE_PROJECT,
    RELEASED_WEIGHTS,
    WeightsDownloadError,
)

__all__ = ["TimmExport", "export_timm", "main", "timm_model_args"]

GLOBAL_POOLS = ("avg", "token")
FALLBACK_ARCHITECTURE = "vit_base_patch16_224"  # any timm ViT entry point: model_args set every dimension
_RGB = "input_adapters.rgb."
_MULTIMAE_PAPER = "arXiv:2204.01678"


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; the message says why and what to change."""


@dataclass
class TimmExport:
    """What :func:`export_timm` wrote.

    Attributes:
        out: The output folder.
        weights: ``<out>/model.safetensors``.
        config: ``<out>/config.json``.
        source: The checkpoint file read.
        format: Its format (see :func:`attent_vision.models.checkpoint.parse_checkpoint`).
        architecture: The timm model name in config.json.
        model_args: The timm model arguments in config.json.
        num_tensors: Tensors in model.safetensors.
        dropped: Checkpoint key groups left out (other inputs, decoders, heads).
        licence: The weights' licence when known (the MultiMAE release's files).
    """

    out: Path
    weights: Path
    config: Path
    source: Path
    format: str
    architecture: str
    model_args: dict[str, Any]
    num_tensors: int
    dropped: list[str] = field(default_factory=list)
    licence: str | None = None


def _blocks(state: Mapping[str, Tensor]) -> int:
    return len({k.split(".")[1] for k in state if k.startswith("encoder.")})


def timm_model_args(
    state: Mapping[str, Tensor], *, num_heads: int | None = None, global_pool: str = "avg"
) -> dict[str, Any]:
    """The timm ``VisionTransformer`` arguments of a MultiMAE encoder, read from its weights.

    Patch size, width, depth, MLP ratio, qkv bias, image size (the stored pos-embedding grid × patch) and the
    number of global tokens come from the tensors; the head count, which no tensor shows, from the encoder size of
    that width and depth (``MODEL_SIZES``) unless ``num_heads`` is given.

    Raises:
        ExportError: No rgb input adapter or encoder, or the head count is unknown or does not divide the width.
    """
    if f"{_RGB}proj.weight" not in state or "global_tokens" not in state or not _blocks(state):
        inputs = sorted({k.split(".")[1] for k in state if k.startswith("input_adapters.")})
        raise ExportError(
            f"the checkpoint has no MultiMAE RGB encoder (inputs {inputs}, {_blocks(state)} encoder blocks): "
            "timm export takes the rgb input adapter, the global tokens and the encoder blocks"
        )
    proj = state[f"{_RGB}proj.weight"]  # [D, C, p, p]
    width, in_chans, patch = int(proj.shape[0]), int(proj.shape[1]), tuple(int(s) for s in proj.shape[-2:])
    grid = tuple(int(s) for s in state[f"{_RGB}pos_emb"].shape[-2:])
    depth = _blocks(state)
    if num_heads is None:
        size = next(
            (n for n, c in MODEL_SIZES.items() if (c["dim_tokens"], c["depth"]) == (width, depth)), None
        )
        if size is None:
            raise ExportError(
                f"no known encoder size has width {width} and {depth} blocks, and the head count is not in the "
                "weights: pass --num-heads"
            )
        num_heads = MODEL_SIZES[size]["num_heads"]
    if width % num_heads:
        raise ExportError(f"--num-heads {num_heads} does not divide the encoder width {width}")
    img_size = [g * p for g, p in zip(grid, patch, strict=True)]
    num_global = int(state["global_tokens"].shape[1])
    args: dict[str, Any] = {
        "img_size": img_size[0] if img_size[0] == img_size[1] else img_size,
        "patch_size": patch[0] if patch[0] == patch[1] else list(patch),
        "in_chans": in_chans,
        "embed_dim": width,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": state["encoder.0.mlp.fc1.weight"].shape[0] / width,
        "qkv_bias": "encoder.0.attn.qkv.bias" in state,
        "class_token": True,  # the first global token
        "no_embed_class": True,  # MultiMAE's global tokens have no position
        "final_norm": False,  # MultiMAE has no final LayerNorm
        "global_pool": global_pool,
        "num_classes": 0,
    }
    if num_global > 1:
        args["reg_tokens"] = num_global - 1
    return args


def _architecture(model_args: Mapping[str, Any]) -> str:
    """timm's ViT entry point of these dimensions when it has one (e.g. vit_base_patch16_224), else a stand-in."""
    import timm

    size = next(
        (
            n
            for n, c in MODEL_SIZES.items()
            if (c["dim_tokens"], c["depth"], c["num_heads"])
            == (model_args["embed_dim"], model_args["depth"], model_args["num_heads"])
        ),
        None,
    )
    name = f"vit_{size}_patch{model_args['patch_size']}_{model_args['img_size']}"
    return name if size and timm.is_model(name) else FALLBACK_ARCHITECTURE


def _release_of(source: str | Path, path: Path) -> str | None:
    """The released name behind ``source`` (the name itself or a copy of the release's file), else None."""
    if str(source) in RELEASED_WEIGHTS:
        return str(source)
    return next((n for n, w in RELEASED_WEIGHTS.items() if w.file == path.name), None)


def export_timm(
    source: str | Path,
    out: str | Path,
    *,
    global_pool: str = "avg",
    num_heads: int | None = None,
    weights_only: bool = True,
) -> TimmExport:
    """Writes the RGB encoder of ``source`` as a timm ViT in timm's hub layout (model.safetensors + config.json).

    The weights are loaded into the timm model strictly before anything is written, so every exported tensor has
    its place and every timm parameter its value.

    Args:
        source: A run directory, checkpoint file, released name or URL (as ``pretrained=``).
        out: The output folder (created; its model.safetensors and config.json are replaced).
        global_pool: timm's pooling for ``forward``: ``avg`` (patch tokens) or ``token`` (the global token).
        num_heads: Attention heads, when the width and depth are not one of ``MODEL_SIZES``.
        weights_only: Safe unpickling; False only for trusted files.

    Raises:
        FileNotFoundError: ``source`` does not resolve to a checkpoint.
        ExportError: The checkpoint has no RGB encoder, or its encoder does not map onto timm's ViT.
    """
    import timm
    from timm.models import save_for_hf

    if global_pool not in GLOBAL_POOLS:
        raise ExportError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    path = resolve_checkpoint(source)
    try:
        obj = read_checkpoint(path, weights_only)
    except ValueError as error:  # read_checkpoint's messages name the file
        raise ExportError(str(error)) from None
    except Exception as error:  # torch.load raises many types for a file that is no checkpoint
        raise ExportError(f"{path}: not a PyTorch checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(obj, Mapping):
        raise ExportError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")
    fmt, state = parse_checkpoint(obj)
    model_args = timm_model_args(state, num_heads=num_heads, global_pool=global_pool)
    architecture = _architecture(model_args)
    release = _release_of(source, path)
    size = model_args["img_size"]
    pretrained_cfg: dict[str, Any] = {
        "architecture": architecture,
        "input_size": (model_args["in_chans"], *((size, size) if isinstance(size, int) else size)),
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "num_classes": 0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "paper_ids": _MULTIMAE_PAPER,
        "description": f"MultiMAE encoder (RGB path) exported by attent_vision from {path.name}",
    }
    if release:
        pretrained_cfg.update(
            license="cc-by-nc-4.0",
            origin_url=RELEASE_PROJECT,
            description=f"{RELEASED_WEIGHTS[release].description} (MultiMAE release, RGB path)",
        )

    vit = timm.create_model(architecture, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
    timm_state = multimae_to_timm_vit(state, no_embed_class=True)
    result = vit.load_state_dict(timm_state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"{path}: the encoder does not map onto timm's VisionTransformer: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    save_for_hf(vit, out, safe_serialization=True)

    kept = {k for k in state if k.startswith(_RGB) or k == "global_tokens" or k.startswith("encoder.")}
    groups = sorted({".".join(k.split(".")[:2]) + ".*" for k in state if k not in kept})
    return TimmExport(
        out=out,
        weights=out / "model.safetensors",
        config=out / "config.json",
        source=path,
        format=fmt,
        architecture=architecture,
        model_args=json.loads((out / "config.json").read_text())["model_args"],
        num_tensors=len(vit.state_dict()),
        dropped=groups,
        licence=RELEASE_LICENCE if release else None,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m attent_vision.tools.export",
        description="Export the RGB encoder of a MultiMAE checkpoint for other libraries. --format timm writes "
        "a timm VisionTransformer in timm's Hugging Face hub layout (model.safetensors + config.json): load it "
        "with timm.create_model('local-dir:OUT', pretrained=True), publish it with "
        "timm.models.push_to_hf_hub (docs/model.md).",
    )
    parser.add_argument(
        "source",
        help="a train.py / finetune.py run directory, a checkpoint file, a released name "
        f"({', '.join(RELEASED_WEIGHTS)}) or an http(s) URL",
    )
    parser.add_argument("--format", choices=("timm",), default="timm", help="output format (default: timm)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--global-pool",
        choices=GLOBAL_POOLS,
        default="avg",
        help="timm's pooling of forward(): avg = mean of the patch tokens (as MultiMAE's linear head "
        "and MAE fine-tuning pool), token = the global token (default: avg)",
    )
    parser.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="attention heads; needed only when the width and depth are none of the known encoder sizes",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Exports as asked and prints what was written; returns the exit code (2 for bad input)."""
    args = parse_args(argv)
    try:
        done = export_timm(args.source, args.out, global_pool=args.global_pool, num_heads=args.num_heads)
    except (FileNotFoundError, WeightsDownloadError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size_mb = done.weights.stat().st_size / 2**20
    a = done.model_args
    print(f"wrote {done.weights} ({done.num_tensors} tensors, {size_mb:.1f} MiB) and {done.config}")
    print(f"  from {done.source} ({done.format} checkpoint)")
    if done.architecture == FALLBACK_ARCHITECTURE and a["embed_dim"] != 768:
        print(
            f"  (timm has no ViT of this size: {done.architecture} is the entry point, model_args set every dimension)"
        )
    print(
        f"  timm {done.architecture}: embed_dim {a['embed_dim']}, depth {a['depth']}, heads {a['num_heads']}, "
        f"patch {a['patch_size']}, img_size {a['img_size']}, global_pool {a['global_pool']}, "
        "no final norm, num_classes 0"
    )
    if done.dropped:
        print(f"  left out (not the RGB encoder): {', '.join(done.dropped)}")
    if done.licence:
        print(f"  licence: {done.licence}, {RELEASE_PROJECT}")
    print(f'  load it: timm.create_model("local-dir:{done.out}", pretrained=True)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
