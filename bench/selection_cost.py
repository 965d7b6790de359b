"""Time and memory of the teacher's bookkeeping at scale: gather, selection and sharding, per strategy.

    python bench/selection_cost.py                         # N = 10k, 100k, 1.28M; world sizes 1, 8, 64
    python bench/selection_cost.py --num-samples 1280000 --world-sizes 8 --strategies soft --repeats 5
    python bench/selection_cost.py --images-per-s 2000     # the per-rank training speed the epoch share assumes

One re-selection as the teacher does it, with the W ranks simulated in one process:

* ``gather``: each rank's shard of (int64 index, float32 score) pairs is concatenated (what all-gather returns)
  and written into the score bank, then read back with unmeasured samples filled;
* ``select``: the strategy's selector (the classes `python train.py selection=...` builds) turns the N scores into
  the epoch's pool (k = ratio x N for random/hard/soft; InfoBatch prunes half of the below-mean samples);
* ``shard``: one rank's sampler takes its shard of the pool (every rank does this once, in parallel).

Each (strategy, N, W) runs in a fresh subprocess; peak memory is the growth of the peak resident set over the
state right before the re-selection (scores already in memory). ``epoch share`` relates the bookkeeping to the
time a rank needs to train on its N/W samples at ``--images-per-s`` (an assumption printed with the table: this
bench does not train). Targets: one selection over 1.28M scores under 0.5 s; bookkeeping under 1% of an epoch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

WORKER = r"""
import json, resource, sys, time
import torch
from attent_vision.selection import (HardSelector, InfoBatchPruner, PlanRequest, RandomSelector, ScoreBank,
                                     SoftSelector, SubsetSampler, subset_size)
n, world, ratio, repeats, strategy = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
selector = {"random": RandomSelector, "hard": HardSelector, "soft": SoftSelector, "infobatch": InfoBatchPruner}[strategy]()
scores = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 5
shards = [(torch.arange(r, n, world, dtype=torch.int64), scores[r::world].clone()) for r in range(world)]
request = PlanRequest(max_epochs=100, dataset_size=n, batch_size=1, world_size=world)
epoch = request.subset_epoch(1, 0, subset_size(ratio, n, world), reselect=True)
bank = ScoreBank(n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = {"gather": [], "select": [], "shard": []}
for r in range(repeats):
    t = time.perf_counter()
    index = torch.cat([i for i, _ in shards]); values = torch.cat([s for _, s in shards])
    bank.update(index, values, step=r)
    filled = bank.filled()
    times["gather"].append(time.perf_counter() - t)
    t = time.perf_counter()
    chosen = selector.select(filled, epoch, generator=torch.Generator().manual_seed(r), world_size=world)
    times["select"].append(time.perf_counter() - t)
    t = time.perf_counter()
    sampler = SubsetSampler(n, seed=r, num_replicas=world, rank=world - 1)
    sampler.set_pool(chosen.indices)
    shard = sampler.shard()
    times["shard"].append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
print(json.dumps({"strategy": strategy, "num_samples": n, "world_size": world, "pool": chosen.indices.numel(),
                  "threads": torch.get_num_threads(), **{f"{k}_s": round(v, 5) for k, v in med.items()},
                  "total_s": round(sum(med.values()), 5), "peak_extra_mib": round((peak - before) / 1024, 1)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-samples", type=int, nargs="+", default=[10_000, 100_000, 1_280_000])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--strategies", nargs="+", default=["random", "hard", "soft", "infobatch"])
    parser.add_argument("--images-per-s", type=float, default=1000.0, help="assumed training speed per rank")
    args = parser.parse_args()
    rows = []
    for n in args.num_samples:
        for world in args.world_sizes:
            for strategy in args.strategies:
                cmd = [
                    sys.executable,
                    "-c",
                    WORKER,
                    str(n),
                    str(world),
                    str(args.ratio),
                    str(args.repeats),
                    strategy,
                ]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"{strategy} N={n} W={world} failed:\n{out.stderr[-2000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["epoch_share"] = row["total_s"] / (n / world / args.images_per_s)
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(f"\nepoch share: bookkeeping / (N / W samples at {args.images_per_s:g} images/s per rank)\n")
    print(
        "| strategy | N | W | pool | gather (s) | select (s) | shard (s) | total (s) | epoch share | extra peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['strategy']} | {r['num_samples']} | {r['world_size']} | {r['pool']} | {r['gather_s']:.4f} | "
            f"{r['select_s']:.4f} | {r['shard_s']:.4f} | {r['total_s']:.4f} | {r['epoch_share']:.2%} | "
            f"{r['peak_extra_mib']} |"
        )


if __name__ == "__main__":
    main()
