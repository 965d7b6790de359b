"""The end-of-run picture of what the teacher did: planned ratio per epoch and score distributions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from attent_vision.selection.plan import EpochPlan


def plot_selection(plan: Sequence[EpochPlan], history: Sequence[dict[str, Any]], path: Path) -> Path:
    """Two panels: the fraction of data each epoch trains on (re-selections marked), and the score quartiles at
    every re-selection with the mean score of the selected samples against that of all samples."""
    fig, (ax_ratio, ax_scores) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, constrained_layout=True)
    epochs = [p.epoch for p in plan]
    ax_ratio.step(
        epochs, [p.ratio for p in plan], where="post", color="tab:blue", label="fraction of the training set"
    )
    resel = [p for p in plan if p.reselect]
    ax_ratio.scatter(
        [p.epoch for p in resel],
        [p.ratio for p in resel],
        color="tab:red",
        s=14,
        zorder=3,
        label="re-selection",
    )
    ax_ratio.set_ylabel("ratio")
    ax_ratio.set_ylim(0, 1.05)
    ax_ratio.legend(loc="lower right", fontsize=8)
    ax_ratio.set_title("AtteNT teacher: data schedule and per-sample scores")

    if history:
        ep = [h["epoch"] for h in history]
        ax_scores.fill_between(
            ep,
            [h["score_min"] for h in history],
            [h["score_max"] for h in history],
            color="tab:gray",
            alpha=0.2,
            step="mid",
            label="min-max",
        )
        ax_scores.fill_between(
            ep,
            [h["score_q25"] for h in history],
            [h["score_q75"] for h in history],
            color="tab:gray",
            alpha=0.45,
            step="mid",
            label="quartiles",
        )
        ax_scores.plot(ep, [h["score_median"] for h in history], color="black", lw=1, label="median")
        ax_scores.plot(
            ep,
            [h["selected_score_mean"] for h in history],
            "o-",
            color="tab:red",
            ms=3,
            label="mean of selected",
        )
        ax_scores.plot(
            ep, [h["all_score_mean"] for h in history], "s--", color="tab:blue", ms=3, label="mean of all"
        )
        ax_scores.legend(loc="upper right", fontsize=8)
    ax_scores.set_xlabel("epoch")
    ax_scores.set_ylabel("score (sum of task losses)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
