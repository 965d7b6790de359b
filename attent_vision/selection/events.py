"""What the teacher reports about each re-selection: one ``selection.jsonl`` line, logger metrics, a log line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from attent_vision.selection.plan import EpochPlan
from attent_vision.selection.selectors import Selection

log = logging.getLogger(__name__)


def selection_event(
    *,
    epoch: EpochPlan,
    selection: Selection,
    scores: Tensor,
    previous: Tensor | None,
    labels: Tensor | None,
    **fields: Any,
) -> dict[str, Any]:
    """The record of one re-selection: the plan entry, score quantiles, what was selected, and ``fields``."""
    chosen = selection.indices
    ordered = scores.double().sort().values  # torch.quantile refuses more than 2^24 values
    last = ordered.numel() - 1
    quantiles = [float(ordered[round(q * last)]) for q in (0.0, 0.25, 0.5, 0.75, 1.0)]
    event = {
        "epoch": epoch.epoch,
        "cycle": epoch.cycle,
        "ratio": round(epoch.ratio, 6),
        "k": int(chosen.numel()),
        **fields,
        "score_min": quantiles[0],
        "score_q25": quantiles[1],
        "score_median": quantiles[2],
        "score_q75": quantiles[3],
        "score_max": quantiles[4],
        "selected_score_mean": float(scores[chosen].mean()),
        "all_score_mean": float(scores.mean()),
        "overlap_with_previous": None
        if previous is None
        else float(torch.isin(previous, chosen).float().mean()),
        "class_histogram": _class_histogram(labels, chosen),
    }
    if selection.weights is not None:
        weighted = selection.weights[chosen]
        event["upweighted"] = int((weighted != 1).sum())
        event["weight_max"] = float(weighted.max())
    return event


def _class_histogram(labels: Tensor | None, chosen: Tensor) -> dict[str, int] | None:
    if labels is None:
        return None
    counts = torch.bincount(labels[chosen])
    return {str(c): int(n) for c, n in enumerate(counts.tolist()) if n}


def write_event(trainer: pl.Trainer, event: dict[str, Any], out_dir: Path) -> None:
    """Append ``event`` to ``selection.jsonl``, log its numbers as ``teacher/*`` and one readable line."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "selection.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")
    metrics = {
        f"teacher/{k}": float(v)
        for k, v in event.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "global_step")
    }
    if event["class_histogram"]:
        metrics.update({f"teacher/class_{c}": n / event["k"] for c, n in event["class_histogram"].items()})
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=event["global_step"])
    log.info(
        "teacher: epoch %d cycle %s ratio %.3f k %d, scoring %.2fs, scores %.3g/%.3g/%.3g, overlap %s",
        event["epoch"],
        event["cycle"],
        event["ratio"],
        event["k"],
        event["scoring_time_s"],
        event["score_min"],
        event["score_median"],
        event["score_max"],
        "-" if event["overlap_with_previous"] is None else f"{event['overlap_with_previous']:.2f}",
    )
