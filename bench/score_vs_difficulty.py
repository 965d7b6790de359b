"""Does the teacher's score track the synthetic scenes' built-in difficulty?

    python bench/score_vs_difficulty.py <run_dir> [--data data/synthetic]

Reads the teacher's score bank from the run's last checkpoint and the generator's per-sample difficulty
factors (``<data>/train/difficulty.json``), and prints the Spearman rank correlation of the score with each
factor, plus the mean difficulty of the top and bottom score quintiles.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchmetrics.functional import spearman_corrcoef

from attent_vision.data.folder import MultiModalFolder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"))
    args = parser.parse_args()
    checkpoint = torch.load(
        args.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    bank = checkpoint["callbacks"]["AtteNTTeacher"]["bank"]
    scores, measured = bank["scores"].double(), bank["measured_at"]
    dataset = MultiModalFolder(args.data / "train")
    factors = json.loads((args.data / "train" / "difficulty.json").read_text())
    stems = [Path(rel).name for rel, _ in dataset.samples]
    keys = [k for k, v in factors[stems[0]].items() if isinstance(v, int | float)]
    known = measured >= 0
    print(f"{int(known.sum())} of {len(stems)} samples scored; checkpoint epoch {checkpoint['epoch']}")
    rows = []
    for key in keys:
        values = torch.tensor([float(factors[s][key]) for s in stems], dtype=torch.float64)
        # Tied values (the integer factors) get the mean of their ranks.
        rows.append((key, float(spearman_corrcoef(scores[known], values[known]))))
    print("| factor | Spearman rho with the teacher's score |\n|---|---|")
    for key, rho in sorted(rows, key=lambda r: -abs(r[1])):
        print(f"| {key} | {rho:+.3f} |")
    difficulty = torch.tensor([float(factors[s]["difficulty"]) for s in stems], dtype=torch.float64)[known]
    order = scores[known].argsort()
    fifth = max(1, order.numel() // 5)
    print(
        f"\nmean difficulty: lowest-score fifth {difficulty[order[:fifth]].mean():.3f}, "
        f"highest-score fifth {difficulty[order[-fifth:]].mean():.3f}, all {difficulty.mean():.3f}"
    )


if __name__ == "__main__":
    main()
