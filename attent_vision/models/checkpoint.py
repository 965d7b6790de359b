"""Reading checkpoints into MultiMAE / MultiViT: find the file, detect its format once, adapt shapes, load, report.

Our Lightning checkpoints, the original MultiMAE release's checkpoints and timm ViT weights (converted by
:mod:`attent_vision.models.checkpoint_keys`) all go through :func:`load_pretrained`; released names and URLs are
downloaded into torch.hub's cache first (:mod:`attent_vision.models.released`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models import clean_state_dict
from torch import Tensor, nn

from attent_vision.models.builders import MODEL_SIZES
from attent_vision.models.checkpoint_keys import is_timm_vit, timm_vit_to_multimae
from attent_vision.models.pos_embed import resize_pos_embed
from attent_vision.models.released import RELEASED_WEIGHTS, fetch_weights, is_url

__all__ = [
    "CheckpointFormat",
    "LoadReport",
    "MissingEncoderWeightsError",
    "adapt_shapes",
    "load_pretrained",
    "normalize_state_dict",
    "parse_checkpoint",
    "read_checkpoint",
    "resolve_checkpoint",
]

log = logging.getLogger(__name__)

_LIGHTNING_PREFIX = "net."

CheckpointFormat = Literal["lightning", "multimae", "timm", "state_dict"]


def parse_checkpoint(obj: Mapping[str, Any]) -> tuple[CheckpointFormat, dict[str, Tensor]]:
    """The format of a checkpoint object, detected once, and its MultiMAE weights.

    Accepts an original MultiMAE checkpoint (``{'model': state}``), a Lightning checkpoint (``{'state_dict':
    ...}`` whose model lives under ``net.``; other entries such as the balancer are dropped), a timm ViT state dict
    (converted with :func:`timm_vit_to_multimae`) or a plain state dict. Strips ``module.`` (DDP) and
    ``_orig_mod.`` (torch.compile) prefixes.
    """
    fmt: CheckpointFormat = "state_dict"
    if isinstance(obj.get("model"), Mapping):
        obj, fmt = obj["model"], "multimae"
    elif isinstance(obj.get("state_dict"), Mapping):
        obj, fmt = obj["state_dict"], "lightning"
    # timm's clean_state_dict drops the DDP (``module.``) and torch.compile (``_orig_mod.``) key prefixes.
    state = clean_state_dict({k: v for k, v in obj.items() if isinstance(v, Tensor)})
    if any(k.startswith(_LIGHTNING_PREFIX) for k in state):
        fmt = "lightning"
        dropped = [k for k in state if not k.startswith(_LIGHTNING_PREFIX)]
        if dropped:
            log.info(
                "Ignoring %d checkpoint entries outside '%s': %s", len(dropped), _LIGHTNING_PREFIX, dropped
            )
        state = clean_state_dict(
            {k[len(_LIGHTNING_PREFIX) :]: v for k, v in state.items() if k.startswith(_LIGHTNING_PREFIX)}
        )
    if is_timm_vit(state):
        fmt = "timm"
        state = timm_vit_to_multimae(state)
    return fmt, state


def normalize_state_dict(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """A checkpoint object's MultiMAE weights (see :func:`parse_checkpoint`)."""
    return parse_checkpoint(obj)[1]


def read_checkpoint(path: str | os.PathLike, weights_only: bool = True) -> Mapping[str, Any]:
    """Loads a checkpoint file on the CPU; ``weights_only`` allows argparse.Namespace (the original MultiMAE
    checkpoints hold one).

    Raises:
        ValueError: The file is no (complete) checkpoint, or holds objects that ``weights_only`` refuses.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):
            raise ValueError(
                f"{path}: not a PyTorch checkpoint (not in torch.save's format: a corrupt or truncated download, "
                "or another kind of file?)"
            ) from err
        raise ValueError(
            f"{path}: checkpoint holds objects that weights_only loading refuses; if you trust the file, pass "
            "weights_only=False"
        ) from err
    except RuntimeError as err:
        if "PytorchStreamReader" not in str(err):
            raise
        raise ValueError(f"{path}: not a complete PyTorch checkpoint (truncated?): {err}") from err


_BLOCK_RE = re.compile(r"^encoder\.(\d+)\.")
_EPOCH_RE = re.compile(r"^epoch_(\d+)")
_MAX_LISTED = 10


class MissingEncoderWeightsError(ValueError):
    """The checkpoint does not provide (or does not fit) every encoder weight of the model.

    Attributes:
        source: The checkpoint file.
        missing: Model encoder keys the checkpoint lacks.
        mismatched: Encoder keys whose shapes differ and cannot be adapted.
        hint: What to change.
    """

    def __init__(
        self, message: str, *, source: str, missing: list[str], mismatched: list[str], hint: str
    ) -> None:
        super().__init__(message)
        self.source = source
        self.missing = missing
        self.mismatched = mismatched
        self.hint = hint


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with each key.

    Attributes:
        source: The checkpoint file (or ``<in-memory>``).
        format: 'lightning', 'multimae' (``{'model': ...}``), 'timm' (converted ViT keys) or 'state_dict'.
        loaded: Model keys filled from the checkpoint.
        missing: Model keys left at their init (the new heads).
        unexpected: Checkpoint keys the model has no place for (e.g. other input modalities).
        resized: Adapted keys as ``"key: (from shape) -> (to shape)"``.
        skipped: Checkpoint keys dropped on purpose (output adapters that are not the model's heads).
    """

    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)

    def write_json(self, path: str | os.PathLike) -> None:
        """Writes the report as indented JSON, creating parent folders."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def counts(self) -> dict[str, int]:
        """How many keys fell in each category."""
        return {n: len(getattr(self, n)) for n in ("loaded", "missing", "unexpected", "resized", "skipped")}

    def summary(self) -> str:
        """One line of counts."""
        counts = ", ".join(f"{count} {name}" for name, count in self.counts().items())
        return f"{self.source} ({self.format}): {counts}"


def _epoch_sort_key(path: Path) -> tuple[int, float, str]:
    match = _EPOCH_RE.match(path.name)
    return (int(match.group(1)) if match else -1, path.stat().st_mtime, path.name)


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """Finds the checkpoint file of ``source``.

    A file is returned as is. For a run directory (or its ``checkpoints/`` folder) this is
    ``checkpoints/last.ckpt`` resolved to its target when it is an existing file (Lightning writes it as a
    symlink), else the newest ``checkpoints/epoch_*.ckpt`` (highest epoch, then modification time). A released
    name (``multimae-b``, ``mae-b``, ... :data:`~attent_vision.models.released.RELEASED_WEIGHTS`; a local path of
    that name wins) or an http(s) URL resolves to its file in torch.hub's cache, downloaded on first use
    (:func:`~attent_vision.models.released.fetch_weights`).

    Raises:
        FileNotFoundError: ``source`` does not exist, or the directory holds no checkpoint.
        WeightsDownloadError: A name or URL that is not cached cannot be downloaded, or fails its hash check.
    """
    path = Path(source).expanduser()
    if is_url(source) or (isinstance(source, str) and source in RELEASED_WEIGHTS and not path.exists()):
        return fetch_weights(source)
    if path.is_file():
        return path
    if not path.exists():
        dangling = " (a dangling symlink)" if path.is_symlink() else ""
        raise FileNotFoundError(
            f"checkpoint source {path} does not exist{dangling}; expected a checkpoint file, a run directory, "
            f"a released name ({', '.join(RELEASED_WEIGHTS)}) or an http(s) URL"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint source {path} is neither a file nor a run directory")
    looked_for = []
    for folder in (path / "checkpoints", path):
        last = folder / "last.ckpt"
        looked_for += [str(last), str(folder / "epoch_*.ckpt")]
        if last.is_file():
            return last.resolve()
        if last.is_symlink():
            log.warning(
                "%s is a dangling link (-> %s); using the newest epoch checkpoint", last, os.readlink(last)
            )
        epochs = sorted((p for p in folder.glob("epoch_*.ckpt") if p.is_file()), key=_epoch_sort_key)
        if epochs:
            return epochs[-1]
    raise FileNotFoundError(f"no checkpoint in {path}: looked for {', '.join(looked_for)}")


def _is_encoder_key(key: str) -> bool:
    return key == "global_tokens" or key.startswith(("input_adapters.", "encoder."))


def _encoder_geometry(state: Mapping[str, Tensor]) -> tuple[int | None, int]:
    """(width, number of blocks) read from MultiMAE keys; width None when nothing tells."""
    width = None
    for key in ("global_tokens", "encoder.0.norm1.weight"):
        if key in state:
            width = int(state[key].shape[-1])
            break
    else:
        proj = [v for k, v in state.items() if k.startswith("input_adapters.") and k.endswith("proj.weight")]
        if proj:
            width = int(proj[0].shape[0])
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k))}
    return width, (max(blocks) + 1 if blocks else 0)


def _describe_encoder(width: int | None, depth: int) -> str:
    name = next(
        (n for n, cfg in MODEL_SIZES.items() if (cfg["dim_tokens"], cfg["depth"]) == (width, depth)), None
    )
    geometry = f"width {width}, {depth} blocks"
    return f"{name} ({geometry})" if name else f"a custom size ({geometry})"


def _input_tasks(state: Mapping[str, Tensor]) -> list[str]:
    return list(dict.fromkeys(k.split(".")[1] for k in state if k.startswith("input_adapters.")))


def _encoder_hint(ckpt: Mapping[str, Tensor], model: Mapping[str, Tensor], mismatched: list[str]) -> str:
    ckpt_geometry, model_geometry = _encoder_geometry(ckpt), _encoder_geometry(model)
    if ckpt_geometry == (None, 0):
        return "the checkpoint holds no MultiMAE or timm ViT encoder weights: is it a pretraining checkpoint?"
    hints = []
    if ckpt_geometry != model_geometry:
        hints.append(
            f"the checkpoint's encoder is {_describe_encoder(*ckpt_geometry)} but the model is "
            f"{_describe_encoder(*model_geometry)}: choose the matching encoder size"
        )
    have = _input_tasks(ckpt)
    absent = [t for t in _input_tasks(model) if t not in have]
    if absent:
        hints.append(
            f"the checkpoint has input adapters for {have} only but the model also takes {absent}: drop "
            f"{absent} from in_domains or use a checkpoint pretrained with them"
        )
    if not hints:
        for key in mismatched:
            got, want = tuple(ckpt[key].shape), tuple(model[key].shape)
            if key.startswith("input_adapters.") and key.endswith("proj.weight") and got[-2:] != want[-2:]:
                hints.append(
                    f"{key} has patch {got[-2:]} in the checkpoint, {want[-2:]} in the model: set patch_size"
                )
            elif key.endswith("class_emb.weight"):
                hints.append(
                    f"the checkpoint embeds {got[0]} semseg classes, the model {want[0]}: set semseg_num_classes to match"
                )
            elif key == "global_tokens":
                hints.append(
                    f"the checkpoint has {got[1]} global tokens, the model {want[1]}: set num_global_tokens"
                )
    if not hints:
        hints.append(
            "the checkpoint's encoder does not cover the model's: is the file truncated or from another model?"
        )
    return "; ".join(hints)


def _listed(keys: list[str]) -> str:
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return f"{keys[:_MAX_LISTED]}{more}"


def _select_heads(
    state: dict[str, Tensor], target: Mapping[str, Tensor], report: LoadReport
) -> dict[str, Tensor]:
    """Keeps a checkpoint output adapter only when its keys and shapes equal one of the model's heads.

    Pretraining decoders never match a fine-tuning head, so all of them are skipped; a fine-tuned checkpoint's
    heads load into the same heads. A partial match is skipped whole, never loaded half.
    """
    by_task: dict[str, list[str]] = {}
    for key in state:
        if key.startswith("output_adapters."):
            by_task.setdefault(key.split(".")[1], []).append(key)
    for task, keys in by_task.items():
        prefix = f"output_adapters.{task}."
        head_keys = {k for k in target if k.startswith(prefix)}
        same = set(keys) == head_keys and all(tuple(state[k].shape) == tuple(target[k].shape) for k in keys)
        if not same:
            report.skipped += keys
            for key in keys:
                del state[key]
    return state


def adapt_shapes(
    state: dict[str, Tensor], target: Mapping[str, Tensor], report: LoadReport
) -> tuple[dict[str, Tensor], list[str]]:
    """Pads class_emb by the padding row and resamples input-adapter pos_embs (bicubic) to the model's; returns the
    adapted state and the keys whose shapes still differ."""
    adapted, mismatched = {}, []
    for key, value in state.items():
        if key not in target or tuple(value.shape) == tuple(target[key].shape):
            adapted[key] = value
            continue
        got, want = tuple(value.shape), tuple(target[key].shape)
        if key.endswith("class_emb.weight") and want == (got[0] + 1, got[1]):
            adapted[key] = F.pad(value, (0, 0, 0, 1))  # zero row for the padding index
        elif key.startswith("input_adapters.") and key.endswith("pos_emb") and got[:2] == want[:2]:
            adapted[key] = resize_pos_embed(value.float(), want[-2:], mode="bicubic").to(value.dtype)
        else:
            mismatched.append(key)
            continue
        report.resized.append(f"{key}: {got} -> {want}")
    return adapted, mismatched


def load_pretrained(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = False,
    report_path: str | os.PathLike | None = None,
    weights_only: bool = True,
) -> LoadReport:
    """Initialises a MultiMAE or a (fine-tuning) MultiViT from a checkpoint, checking the encoder: the one loader.

    Accepts our Lightning checkpoints (model under ``net.``), original MultiMAE checkpoints (``{'model': ...}``,
    ``module.`` prefixes, with or without output adapters), timm ViT state dicts (converted) and plain state
    dicts, as a file, a run directory, a released name or a URL (see :func:`resolve_checkpoint`) or an in-memory
    dict. Before loading:
    checkpoint output adapters that are not exactly the model's heads are skipped; a semseg ``class_emb`` gets
    the model's padding row (133 → 134); input-adapter pos_embs are resampled (bicubic) to the model's grid.
    The model's heads being missing is expected; every encoder weight (``input_adapters.*``, ``global_tokens``,
    ``encoder.*``) must come from the checkpoint with a fitting shape.

    Args:
        model: The model to fill (not wrapped by DDP or torch.compile).
        source: Checkpoint file, run directory, released name (``multimae-b``, ...), http(s) URL or checkpoint
            dict.
        strict: Also require every model key to be filled and every checkpoint key to be used (shape
            adaptations still apply); a ValueError names what differs.
        report_path: Where to write the :class:`LoadReport` as JSON.
        weights_only: Safe unpickling (argparse.Namespace allowed); False only for trusted files.

    Returns:
        The load report.

    Raises:
        MissingEncoderWeightsError: An encoder weight is missing, has another shape, or the checkpoint's
            encoder is deeper; the message names the file, the keys and a hint (e.g. the encoder sizes).
        FileNotFoundError: ``source`` cannot be resolved to a checkpoint file.
        WeightsDownloadError: A released name or URL cannot be downloaded (see :func:`resolve_checkpoint`).
        ValueError: ``strict`` and the checkpoint's keys differ from the model's.
    """
    if isinstance(source, Mapping):
        obj, label = source, "<in-memory>"
    else:
        path = resolve_checkpoint(source)
        obj, label = read_checkpoint(path, weights_only), str(path)
    fmt, ckpt = parse_checkpoint(obj)
    report = LoadReport(source=label, format=fmt)
    target = model.state_dict()

    state = _select_heads(dict(ckpt), target, report)
    state, mismatched = adapt_shapes(state, target, report)
    missing_encoder = [k for k in target if _is_encoder_key(k) and k not in state and k not in mismatched]
    mismatched_encoder = [k for k in mismatched if _is_encoder_key(k)]
    extra_blocks = [k for k in state if k.startswith("encoder.") and k not in target]
    if missing_encoder or mismatched_encoder or extra_blocks:
        hint = _encoder_hint(ckpt, target, mismatched_encoder)
        lines = [f"{label}: the checkpoint does not fit the model's encoder"]
        if missing_encoder:
            lines.append(f"  missing ({len(missing_encoder)}): {_listed(missing_encoder)}")
        if mismatched_encoder:
            shapes = [
                f"{k} {tuple(ckpt[k].shape)} vs model {tuple(target[k].shape)}" for k in mismatched_encoder
            ]
            lines.append(f"  shape mismatches ({len(shapes)}): {_listed(shapes)}")
        if extra_blocks:
            lines.append(f"  blocks the model lacks ({len(extra_blocks)}): {_listed(extra_blocks)}")
        lines.append(f"Hint: {hint}")
        raise MissingEncoderWeightsError(
            "\n".join(lines),
            source=label,
            missing=missing_encoder,
            mismatched=mismatched_encoder,
            hint=hint,
        )
    for key in mismatched:  # outside the encoder and the heads: nothing to adapt, so leave it at its init
        log.warning(
            "Skipping %s: checkpoint shape %s, model shape %s",
            key,
            tuple(ckpt[key].shape),
            tuple(target[key].shape),
        )
        report.skipped.append(key)

    result = model.load_state_dict(state, strict=False)
    report.loaded = [k for k in state if k in target]
    report.missing = list(result.missing_keys)
    report.unexpected = list(result.unexpected_keys)
    if strict and (report.missing or report.unexpected or report.skipped):
        misfits = [
            f"{k} {tuple(ckpt[k].shape)} vs model {tuple(target[k].shape)}"
            for k in report.skipped
            if k in target and tuple(ckpt[k].shape) != tuple(target[k].shape)
        ]
        raise ValueError(
            f"{label}: strict loading, but the checkpoint's keys differ from the model's: "
            + (f"shape mismatches {_listed(misfits)}, " if misfits else "")
            + f"missing {_listed(report.missing)}, unexpected {_listed(report.unexpected)}, "
            f"skipped {_listed(report.skipped)}"
        )
    log.info("Loaded pretrained weights: %s", report.summary())
    if report.missing:
        log.info("Left at init (%d): %s", len(report.missing), _listed(report.missing))
    if report.skipped:
        log.info("Skipped checkpoint keys (%d): %s", len(report.skipped), _listed(report.skipped))
    if report_path is not None:
        report.write_json(report_path)
    return report
