"""Time and memory of one AtteNT selection over many scores (default: 1.28 M, ImageNet-1k sized).

    python bench/selection_cost.py [--num-samples 1280000] [--ratio 0.5] [--repeats 5]

Each strategy runs in a fresh subprocess so its peak resident memory can be read without the others' residue;
the reported memory is the growth of the peak RSS over the process state right before selecting (scores already
in memory). Prints a JSON line per strategy and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

WORKER = r"""
import json, resource, sys, time
import torch
from attent_vision.selection import select
n, ratio, repeats, strategy = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
scores = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 5
k = int(n * ratio)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for r in range(repeats):
    g = torch.Generator().manual_seed(r)
    t = time.perf_counter()
    chosen = select(strategy, scores, k, generator=g)
    times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert chosen.numel() == k and chosen.dtype == torch.int64
print(json.dumps({"strategy": strategy, "num_samples": n, "k": k, "threads": torch.get_num_threads(),
                  "median_s": sorted(times)[len(times) // 2], "min_s": min(times),
                  "peak_extra_mib": round((peak - before) / 1024, 1)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-samples", type=int, default=1_280_000)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--strategies", nargs="+", default=["random", "hard", "soft"])
    args = parser.parse_args()
    rows = []
    for strategy in args.strategies:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                WORKER,
                str(args.num_samples),
                str(args.ratio),
                str(args.repeats),
                strategy,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| strategy | samples | k | median time (s) | min time (s) | extra peak memory (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['strategy']} | {r['num_samples']} | {r['k']} | {r['median_s']:.4f} | {r['min_s']:.4f} | "
            f"{r['peak_extra_mib']} |"
        )


if __name__ == "__main__":
    main()
