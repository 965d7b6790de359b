"""The paper's Table 3 in miniature: pretraining time (scoring included) against downstream quality, per method.

    python bench/table3.py --jobs 2             # every row, seeds 0 1 2 (86 minutes on 2 CPU cores)
    python bench/table3.py --quick              # one seed, six rows, shorter runs, two at a time (9.5 minutes)
    python bench/table3.py --out outputs/bench/table3 --seeds 0 1 2 3   # resumes there: finished runs are kept

For every row and seed: `python train.py <row overrides> seed=S` with a fixed epoch budget on the embedded data,
then `python finetune.py task=cls|semseg|depth pretrained=<that run> seed=S`; ``--jobs`` runs go side by side, each
with cores/jobs threads (rows share the machine's state: quote ratios from one invocation). Two controls come from
measured rows:

* ``full, time-matched``: the full-data baseline with fewer epochs (same schedule shape: warm-up scaled alike), as
  many as fit in the default AtteNT row's pretraining time for the same seed;
* ``random, same samples``: uniform random subsets on the same subset epochs at one constant ratio that trains as
  many samples as the default AtteNT row (its schedule without the difficulty prior and without the growing ratio).

Writes ``table3.md`` (the table), ``table3.json`` (every run's numbers), ``downstream_vs_time.png`` and
``val_loss_vs_time.png`` into ``--out``. A run whose summary says finished is never repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "cls": ("top1", "ImageNet-S50 top-1"),
    "semseg": ("mIoU", "NYUv2 mIoU"),
    "depth": ("delta1", "NYUv2 δ1"),
}
DEFAULT_ROW = "soft"  # the project's default teacher: the controls are matched to it


@dataclass(frozen=True)
class Row:
    name: str
    method: str  # the Table 3 "method" column
    ratio: str = "–"
    interval: str = "–"
    scoring: str = "–"
    overrides: tuple[str, ...] = ()
    control: str | None = None  # time_matched | same_samples: overrides come from measured rows


INCR = ("ratio=incremental", "interval=incremental")
ROWS = [
    Row("full", "full data (baseline)", overrides=("selection=none",)),
    Row("random", "AtteNT random", "incremental", "incremental", "–", ("selection=random", *INCR)),
    Row("hard", "AtteNT hard", "incremental", "incremental", "full", ("selection=hard", *INCR)),
    Row("soft", "AtteNT soft", "incremental", "incremental", "full", ("selection=soft", *INCR)),
    Row("hard_cos", "AtteNT hard", "cosine", "incremental", "full", ("selection=hard", "ratio=cosine")),
    Row("soft_cos", "AtteNT soft", "cosine", "incremental", "full", ("selection=soft", "ratio=cosine")),
    Row("soft_fixed", "AtteNT soft", "incremental", "fixed", "full", ("selection=soft", "interval=fixed")),
    Row(
        "soft_cycle",
        "AtteNT soft",
        "incremental",
        "incremental",
        "full, once per cycle",
        ("selection=soft", *INCR, "scoring.refresh=cycle"),
    ),
    Row(
        "soft_online",
        "AtteNT soft",
        "incremental",
        "incremental",
        "online",
        ("selection=soft", *INCR, "scoring=online"),
    ),
    Row("infobatch", "InfoBatch (r=0.5, δ=0.875)", scoring="online", overrides=("selection=infobatch",)),
    Row("full_time_matched", "full data, time-matched", control="time_matched"),
    Row("random_same_samples", "random, same samples", "constant", "incremental", control="same_samples"),
]
# Not in the default set: the bf16 quality check of the default row (its time is only meaningful on a CPU with
# native bf16 or a GPU; elsewhere autocast emulates bf16).
EXTRA_ROWS = [
    Row(
        "soft_bf16",
        "AtteNT soft, bf16 autocast",
        "incremental",
        "incremental",
        "full",
        ("selection=soft", *INCR, "trainer.precision=bf16-mixed"),
    )
]
# The settings the project's default may take (difficulty-aware AtteNT: which scoring, how often, which schedule);
# random selection, InfoBatch and the controls are yardsticks, reported but never made the default.
DEFAULT_CANDIDATES = ("soft", "hard", "hard_cos", "soft_cos", "soft_fixed", "soft_cycle", "soft_online")
QUICK_ROWS = ["full", "random", "soft", "soft_online", "infobatch", "full_time_matched"]


@dataclass
class Sizes:
    """The fixed budget of every row (Hydra overrides for train.py and finetune.py)."""

    pretrain: list[str] = field(default_factory=list)
    finetune: dict[str, list[str]] = field(default_factory=dict)
    epochs: int = 0
    warmup_epochs: float = 0.0


def sizes_for(quick: bool, out: Path) -> Sizes:
    # 4 cycles with intervals 2..3 is the default schedule's shape (10 cycles, intervals 5..10) at a fifth of its
    # length; the downstream sets are smaller than the embedded defaults (fine-tuning would dominate otherwise)
    # and live under --out, so the benchmark never rewrites the project's data folder.
    cycles, epochs = (3, 12) if quick else (4, 20)
    pretrain = [
        f"selection.total_cycles={cycles}",
        "interval.initial=2",
        "interval.max=3",
        f"trainer.max_epochs={epochs}",
        "model.warmup_epochs=2",
    ]
    ft_epochs = {"cls": 2, "semseg": 1, "depth": 1} if quick else {"cls": 4, "semseg": 4, "depth": 4}
    dense = (
        [f"data.root={out / 'data' / 'nyu'}"]
        + (["data.synthetic.num_train=128", "data.synthetic.num_eval=96"] if quick
           else ["data.synthetic.num_train=192", "data.synthetic.num_eval=128"])
    )  # fmt: skip
    # A few epochs must separate the encoders: validation only after the last epoch, and for classification a
    # short recipe (no Mixup/CutMix, 10x the base LR, no layer decay) instead of the 20-epoch regularised one.
    common = ["trainer.check_val_every_n_epoch=1000"]
    fast_cls = ["module.mixup=0", "module.cutmix=0", "module.blr=5e-3", "module.layer_decay=null"]
    finetune = {
        task: [f"trainer.max_epochs={n}", *common, *(fast_cls if task == "cls" else dense)]
        for task, n in ft_epochs.items()
    }
    return Sizes(pretrain=pretrain, finetune=finetune, epochs=epochs, warmup_epochs=2.0)


class RunFailed(RuntimeError):
    pass


def run_script(script: str, args: list[str], log: Path, threads: int) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline", "OMP_NUM_THREADS": str(threads)}
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, str(ROOT / script), *args], env=env, stdout=out, stderr=out, cwd=ROOT
        )
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RunFailed(f"{script} {' '.join(args)} failed (exit {proc.returncode}); log {log}:\n{tail}")


def finished(run_dir: Path) -> dict | None:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("status") == "finished" else None


def subset_epochs(history: list[dict]) -> int:
    """Epochs that trained fewer samples than a full epoch (``samples_seen`` is cumulative in the history)."""
    seen = [h["samples_seen"] for h in history]
    per_epoch = [b - a for a, b in zip([0, *seen], seen, strict=False)]
    return sum(n < max(per_epoch) for n in per_epoch)


def control_overrides(row: Row, seed: int, results: dict, sizes: Sizes) -> list[str]:
    base, default = results.get(("full", seed)), results.get((DEFAULT_ROW, seed))
    if base is None or default is None:
        raise RunFailed(f"row {row.name} needs the rows 'full' and '{DEFAULT_ROW}' for seed {seed} first")
    if row.control == "time_matched":
        fraction = default["pretrain_time_s"] / base["pretrain_time_s"]
        epochs = max(1, round(sizes.epochs * fraction))
        warmup = sizes.warmup_epochs * epochs / sizes.epochs
        return ["selection=none", f"trainer.max_epochs={epochs}", f"model.warmup_epochs={warmup:.3f}"]
    # The same full-data epochs as the default row; on its subset epochs one constant ratio that trains as many
    # samples as the default row's growing ratios did.
    per_epoch = base["samples_seen"] / sizes.epochs
    full_epochs = sizes.epochs - default["subset_epochs"]
    ratio = (default["samples_seen"] - full_epochs * per_epoch) / (default["subset_epochs"] * per_epoch)
    return ["selection=random", *INCR, "ratio=constant", f"ratio.initial={ratio:.4f}"]


def run_row(row: Row, seed: int, out: Path, sizes: Sizes, results: dict, threads: int) -> dict:
    """Pretrains and fine-tunes one (row, seed), reusing whatever already finished; returns its numbers."""
    job = out / row.name / f"seed{seed}"
    job.mkdir(parents=True, exist_ok=True)
    pretrain_dir = job / "pretrain"
    overrides = list(row.overrides) if row.control is None else control_overrides(row, seed, results, sizes)
    summary = finished(pretrain_dir)
    if summary is None:
        args = [*sizes.pretrain, *overrides, f"seed={seed}", f"hydra.run.dir={pretrain_dir}", "resume=restart",
                "trainer.enable_progress_bar=false", "~callbacks.reconstructions", "~callbacks.selection_gallery"]  # fmt: skip
        run_script("train.py", args, job / "pretrain.log", threads)
        summary = finished(pretrain_dir)
        if summary is None:
            raise RunFailed(f"{pretrain_dir}/summary.json does not say finished")
    result = {
        "row": row.name,
        "seed": seed,
        "overrides": overrides,
        "pretrain_time_s": summary["wall_time_s"],
        "scoring_time_s": summary.get("scoring_time_s") or 0.0,
        "samples_seen": summary["samples_seen"],
        "final_val_loss": summary["final_val_loss"],
        "subset_epochs": subset_epochs(summary["history"]),
        "pretrain_dir": str(pretrain_dir),
    }
    for task, (metric, _) in TASKS.items():
        ft_dir = job / f"ft_{task}"
        ft = finished(ft_dir)
        if ft is None:
            args = [f"task={task}", f"pretrained={pretrain_dir}", f"seed={seed}", *sizes.finetune[task],
                    f"hydra.run.dir={ft_dir}", "write_downstream=false", "trainer.enable_progress_bar=false"]  # fmt: skip
            run_script("finetune.py", args, job / f"ft_{task}.log", threads)
            ft = finished(ft_dir)
            if ft is None:
                raise RunFailed(f"{ft_dir}/summary.json does not say finished")
        result[metric] = ft["metrics"]["final"][metric]
        result[f"{task}_time_s"] = ft["wall_time_s"]
    return result


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def pm(values: list[float], spec: str) -> str:
    mean, std = mean_std(values)
    return f"{mean:{spec}}" + (f" ± {std:{spec}}" if std is not None else "")


def summarise(rows: list[Row], seeds: list[int], results: dict) -> tuple[str, list[dict]]:
    base = [results[("full", s)] for s in seeds if ("full", s) in results]
    base_time = statistics.fmean(r["pretrain_time_s"] for r in base) if base else None
    base_samples = statistics.fmean(r["samples_seen"] for r in base) if base else None
    lines = [
        "| method | ratio | interval | scoring | pretraining time (s) | × baseline | samples | scoring (s) | "
        "val loss | top-1 (%) | mIoU (%) | δ1 (%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    aggregated = []
    for row in rows:
        runs = [results[(row.name, s)] for s in seeds if (row.name, s) in results]
        if not runs:
            continue
        col = {key: [r[key] for r in runs] for key in runs[0] if isinstance(runs[0][key], (int, float))}
        ratio = (
            pm([t / base_time for t in col["pretrain_time_s"]], ".3f") if base_time else "–"
        )  # per-seed times over the mean baseline time: the spread shows the timing noise
        samples = statistics.fmean(col["samples_seen"])
        sample_text = f"{samples:.0f}" + (f" ({samples / base_samples:.3f}×)" if base_samples else "")
        lines.append(
            f"| {row.method} | {row.ratio} | {row.interval} | {row.scoring} | {pm(col['pretrain_time_s'], '.1f')} | "
            f"{ratio} | {sample_text} | {pm(col['scoring_time_s'], '.1f')} | {pm(col['final_val_loss'], '.4f')} | "
            f"{pm(col['top1'], '.2f')} | {pm(col['mIoU'], '.2f')} | {pm(col['delta1'], '.2f')} |"
        )
        aggregated.append({"row": row.name, "method": row.method, "seeds": len(runs),
                           **{k: mean_std(v) for k, v in col.items() if k != "seed"}})  # fmt: skip
    return "\n".join(lines), aggregated


def verdict(rows: list[Row], aggregated: list[dict]) -> str:
    """The rule for the default (issue 9): the fastest teacher setting (:data:`DEFAULT_CANDIDATES`) whose three
    downstream metrics are all within one standard deviation of the full-data baseline (over seeds) or better."""
    by_row = {agg["row"]: agg for agg in aggregated}
    base = by_row.get("full")
    if base is None or base["seeds"] < 2:
        return "(needs the full-data row with at least two seeds)"
    lines = []
    passing = []
    for row in rows:
        agg = by_row.get(row.name)
        if agg is None or row.name == "full":
            continue
        gaps = {}
        for metric, _ in TASKS.values():
            (mean, _), (base_mean, base_std) = agg[metric], base[metric]
            gaps[metric] = (mean - base_mean) / base_std if base_std else float("nan")
        ratio = agg["pretrain_time_s"][0] / base["pretrain_time_s"][0]
        ok = all(gap >= -1 for gap in gaps.values())
        if ok and row.name in DEFAULT_CANDIDATES:
            passing.append((ratio, row.name))
        deltas = ", ".join(f"{metric} {gap:+.2f} std" for metric, gap in gaps.items())
        lines.append(
            f"- {row.name}: {ratio:.3f}× the baseline's time; {deltas} -> {'meets' if ok else 'misses'}"
        )
    best = min(passing) if passing else None
    lines.append(
        f"\nfastest teacher setting meeting the rule: {best[1]} ({best[0]:.3f}×)"
        if best
        else "\nno setting meets the rule"
    )
    return "\n".join(lines)


def plot(rows: list[Row], aggregated: list[dict], results: dict, seeds: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attent_vision.tools.report.collect import load_job, loss_curve

    methods = {row.name: f"{row.method} ({row.ratio}/{row.interval}, {row.scoring})" for row in rows}
    # One colour and marker per row (tab10 alone repeats after ten rows); controls dashed in the loss plot.
    colours = {row.name: plt.get_cmap("tab20")(i % 20) for i, row in enumerate(rows)}
    markers = {row.name: "osD^v<>ph*XP"[i % 12] for i, row in enumerate(rows)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (metric, label) in zip(axes, TASKS.values(), strict=True):
        for agg in aggregated:
            (x, xerr), (y, yerr) = agg["pretrain_time_s"], agg[metric]
            name = agg["row"]
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=markers[name], color=colours[name], capsize=3,
                        label=methods[name])  # fmt: skip
        ax.set(xlabel="pretraining wall time, scoring included (s)", ylabel=f"{label} (%)", title=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(out / "downstream_vs_time.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        run = results.get((row.name, seeds[0]))
        if run is None:
            continue
        times, losses = loss_curve(load_job(Path(run["pretrain_dir"])))
        style = "--" if row.control else "-"
        ax.plot(times, losses, style, marker=".", color=colours[row.name], label=methods[row.name])
    ax.set(
        xlabel="elapsed pretraining time (s)",
        ylabel="validation loss",
        title=f"validation loss (seed {seeds[0]})",
    )
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "val_loss_vs_time.png", dpi=120)
    plt.close(fig)


def prepare_data(sizes: Sizes) -> None:
    """Writes the embedded pretraining and downstream sets first, through the data modules' own prepare_data: runs
    side by side would otherwise race to write them, and no run's time should include writing them."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import attent_vision.config  # noqa: F401  (registers the config resolvers)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        configs = [compose("train", overrides=[*sizes.pretrain, f"paths.root_dir={ROOT}"])]
        configs += [
            compose("finetune", overrides=[f"task={t}", *sizes.finetune[t], f"paths.root_dir={ROOT}"])
            for t in TASKS
        ]
    for cfg in configs:
        instantiate(cfg.data).prepare_data()


def run_all(rows: list[Row], seeds: list[int], out: Path, sizes: Sizes, jobs: int, threads: int) -> dict:
    """Runs every (row, seed), ``jobs`` at a time; a control starts once the rows it is matched to finished."""
    first = [DEFAULT_ROW, "full"]  # the controls' inputs first, so that they can start early
    order = sorted(
        rows,
        key=lambda r: (
            r.control is not None,
            r.name not in first,
            first.index(r.name) if r.name in first else 0,
        ),
    )
    pending = [
        (row, seed) for seed in seeds for row in order
    ]  # seed-major: an interrupted run has whole seeds
    results: dict[tuple[str, int], dict] = {}

    def ready(row: Row, seed: int) -> bool:
        return row.control is None or all((name, seed) in results for name in ("full", DEFAULT_ROW))

    def run(row: Row, seed: int) -> tuple[tuple[str, int], dict]:
        t0 = time.perf_counter()
        result = run_row(row, seed, out, sizes, results, threads)
        print(json.dumps({**result, "bench_s": round(time.perf_counter() - t0, 1)}), flush=True)
        return (row.name, seed), result

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running: set = set()
        while pending or running:
            for item in [p for p in pending if ready(*p)]:
                if len(running) >= jobs:
                    break
                pending.remove(item)
                running.add(pool.submit(run, *item))
            if not running:
                raise RunFailed(f"nothing can run: {[(r.name, s) for r, s in pending]} wait for missing rows")
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                key, result = future.result()  # a failed run raises here; the running ones finish first
                results[key] = result
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--quick", action="store_true", help="one seed, six rows, a shorter budget")
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=[r.name for r in ROWS + EXTRA_ROWS],
        help="default: every row but soft_bf16",
    )
    parser.add_argument("--out", type=Path, help="default: outputs/bench/table3[_quick]")
    parser.add_argument(
        "--jobs",
        type=int,
        help="runs at a time, each with cores/jobs threads (default 1, the cleanest timings; --quick: 2)",
    )
    args = parser.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    names = args.rows or (QUICK_ROWS if args.quick else [r.name for r in ROWS])
    rows = [r for r in ROWS + EXTRA_ROWS if r.name in names]
    out = args.out or ROOT / "outputs" / "bench" / ("table3_quick" if args.quick else "table3")
    out.mkdir(parents=True, exist_ok=True)
    sizes = sizes_for(args.quick, out)
    jobs = args.jobs or (2 if args.quick else 1)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    prepare_data(sizes)
    start = time.perf_counter()
    results = run_all(rows, seeds, out, sizes, jobs, threads)
    table, aggregated = summarise(rows, seeds, results)
    header = (
        f"Table 3 miniature, seeds {seeds}, {'--quick' if args.quick else 'full'} budget: pretraining "
        f"{' '.join(sizes.pretrain)}; fine-tuning {json.dumps(sizes.finetune)}. Mean ± std over seeds; "
        f"× baseline = each seed's time over the mean full-data time. Benchmark took {time.perf_counter() - start:.0f} s."
    )
    rule = verdict(rows, aggregated)
    (out / "table3.md").write_text(
        f"{header}\n\n{table}\n\nDownstream metrics against the baseline's spread:\n{rule}\n"
    )
    (out / "table3.json").write_text(
        json.dumps({"runs": list(results.values()), "aggregated": aggregated}, indent=1)
    )
    plot(rows, aggregated, results, seeds, out)
    print(
        f"\n{header}\n\n{table}\n\n{rule}\n\nwrote {out}/table3.md, table3.json, downstream_vs_time.png, val_loss_vs_time.png"
    )


if __name__ == "__main__":
    main()
