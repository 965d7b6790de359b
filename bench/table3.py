"""The paper's Table 3 in miniature: pretraining cost against downstream quality, per method, paired by seed.

    python bench/table3.py                                  # shipped schedule, probes, seeds 0-4, one run at a time
    python bench/table3.py --schedule mini --evals finetune # the earlier 20-epoch miniature with fine-tuning
    python bench/table3.py --quick                          # pipeline check: full + soft + scratch, seeds 0 1, tiny
    python bench/table3.py --rows full --out outputs/bench/table3_pilot       # a pilot: the full-data row only ...
    python bench/table3.py --margins-from outputs/bench/table3_pilot/table3.json   # ... gives margins for MARGINS

**Rows and seeds.** For every row and seed: ``python train.py <schedule> <row overrides> seed=S``, then one
``python finetune.py task=T [probe=P] pretrained=<that run> seed=S`` per evaluation stage. Every row gets exactly
the seeds of the full-data row, and the seed reaches every row the same way: ``seed=S`` goes last, no row may
override a seed key, and before anything runs every row's composed config is checked to give the same ``seed``,
``data.seed``, ``teacher.seed``, synthetic data and network as the full-data row's (:func:`check_same_seed`). That
is what makes the pairing hold: ``train.py`` seeds the global RNG right before building the network (same init for
every row), the teacher's sampler shuffles by (seed, epoch) (a full epoch trains in the same order in every row),
and augmentations and masks draw from (seed, epoch, sample) streams. A subset epoch necessarily trains other
samples, so data order matches only where the row allows it. The evaluation commands differ between rows in
``pretrained=`` alone. The from-scratch row (``scratch``) runs the same evaluations with ``pretrained=null`` per
seed, and the chance row is the trivial predictor's level that every evaluation's ``summary.json`` reports
(``chance``).

**Schedules.** ``shipped`` (the default) trains train.py's own length (100 epochs, 10 cycles, intervals 5..10: no
epoch or cycle override) with rows full data, soft (the default teacher), ``scoring=online``,
``scoring.refresh=cycle``, random selection on the same schedule and InfoBatch. ``mini`` is the earlier miniature
(20 epochs, 4 cycles, intervals 2..3) with every row, including the two controls matched on measured rows:
``full_time_matched`` (full data for as many epochs as fit in the default row's time for the same seed) and
``random_same_samples`` (random subsets at one constant ratio that trains as many samples as the default row).
``--quick`` shrinks the mini schedule further (6 epochs, 2 cycles, intervals 1..2) and runs full, soft and scratch
on two seeds with shorter evaluations, two runs at a time: a check that the whole pipeline works, not a
measurement.

**Evaluations** (``--evals``): ``probe`` (default; the verdict rests on them) = ``knn_cls`` (``task=cls
probe=knn``), ``linear_cls``, ``linear_semseg``, ``linear_depth`` (``probe=linear``); ``finetune`` = ``ft_cls``,
``ft_semseg``, ``ft_depth``; ``all``; or stage names. A probe or fine-tuning run's ``summary.json`` holds
``metrics.final`` (every number is reported) and ``chance``.

**Statistics** (95%, Student's t from scipy.stats): for a downstream number x and seeds i that both the row and
the full-data row finished, d_i = x_row,i - x_full,i; the table shows mean(d) with mean(d) -/+
t(0.975, n-1) * sd(d) / sqrt(n). Time (and CPU seconds) is compared as the log of the paired ratio,
l_i = ln(T_row,i / T_full,i), with the same t-interval on l, reported as exp(mean l) [exp(low), exp(high)]: the
geometric mean of the paired ratios. Logs rather than the mean of plain ratios because timing noise is
multiplicative (a busy neighbour slows a whole run by a factor), a ratio of 2 and one of 1/2 should average to 1
(the plain mean gives 1.25 and is biased upwards by Jensen's inequality), and the exponentiated interval can never
reach below 0.

**Margins** (non-inferiority): a row *meets* a higher-is-better metric when the low end of its paired interval is
above -margin, a lower-is-better one (abs_rel, rmse, ...) when the high end is below +margin, and *is faster* when
the high end of its time ratio's interval is below 1. The margins are data, :data:`MARGINS`, fixed before the full
run from a pilot's measured seed spread of the full-data row: ``--margins-from <pilot table3.json>`` prints
:data:`MARGIN_K` x that standard deviation per metric for pasting. A metric without a margin is reported as
"no margin" and decides nothing. Verdict: the fastest of :data:`DEFAULT_CANDIDATES` that meets every verdict
metric (the probes' when probes ran, else fine-tuning's) and is faster.

**Costs** beside wall time, per run, that machine noise does not move: samples trained (``samples_seen``), optimizer
steps, scoring passes and the forward samples they cost (passes x training-set size: the teacher records passes,
not samples), and the child process's CPU seconds (user + system, from ``os.wait4`` on that child alone: its own
threads and the subprocesses it waited for, such as DataLoader workers, never a parallel run's).

**Timing.** ``--jobs 1`` (the default but for ``--quick``) is the choice for wall times: a run then has the machine
without a neighbour. ``--jobs 2`` halves the benchmark's duration, but each wall time then includes a neighbour's
contention; the counts are unaffected and CPU seconds nearly so.

**Resume.** Every stage (pretraining and each evaluation) writes ``summary.json`` and ``<stage>.cost.json`` in
``--out/<row>/seed<S>/``; a stage whose summary says finished is never repeated, unless its pretraining ran again.
Writes ``table3.md``, ``table3.json`` (every run's numbers, the statistics, the settings), ``paired_vs_time.png``
and ``val_loss_vs_time.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROW = "soft"  # the project's default teacher: the controls are matched to it
CONFIDENCE = 0.95
TIME_TARGET = 0.70  # the default's time-ratio target; informative, the verdict does not need it


# ------------------------------------------------------------------------------------------------ rows


@dataclass(frozen=True)
class Row:
    name: str
    method: str  # the Table 3 "method" column
    ratio: str = "–"
    interval: str = "–"
    scoring: str = "–"
    overrides: tuple[str, ...] = ()
    control: str | None = None  # time_matched | same_samples: overrides come from measured rows
    pretrains: bool = True  # False: the evaluations start from a random encoder (pretrained=null)


INCR = ("ratio=incremental", "interval=incremental")
FULL = Row("full", "full data (baseline)", overrides=("selection=none",))
SCRATCH = Row("scratch", "from scratch (no pretraining)", pretrains=False)
ROWS = [
    FULL,
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
    SCRATCH,
]
# Not in any default set: the bf16 quality check of the default row (its time is only meaningful on a CPU with
# native bf16 or a GPU; elsewhere autocast emulates bf16).
EXTRA_ROWS = [
    # The precision check of the full-data row: fp32 against the default precision (bf16-mixed on a GPU or a CPU with
    # native bf16; on other CPUs both rows are fp32 and the pair only measures run-to-run noise).
    Row("full_fp32", "full data, fp32", overrides=("selection=none", "trainer.precision=32-true")),
    Row(
        "soft_bf16",
        "AtteNT soft, bf16 autocast",
        "incremental",
        "incremental",
        "full",
        ("selection=soft", *INCR, "trainer.precision=bf16-mixed"),
    ),
]
ALL_ROWS = {row.name: row for row in ROWS + EXTRA_ROWS}
# The settings the project's default may take (difficulty-aware AtteNT: which scoring, how often, which schedule);
# random selection, InfoBatch, the controls and scratch are yardsticks, reported but never made the default.
DEFAULT_CANDIDATES = ("soft", "hard", "hard_cos", "soft_cos", "soft_fixed", "soft_cycle", "soft_online")
SCHEDULE_ROWS = {
    "shipped": ["full", "soft", "soft_online", "soft_cycle", "random", "infobatch", "scratch"],
    "mini": [row.name for row in ROWS],
    "quick": ["full", "soft", "scratch"],
}
# Keys through which a row could give its runs other seeds than the full-data row's: no row may override them.
SEED_KEYS = ("seed", "data.seed", "teacher.seed", "data.synthetic.seed")
# What the composed configs of all rows must share with the full-data row for one seed: the seeds, the data the
# seed orders, and the network the seed initialises.
SAME_AS_FULL = ("seed", "data.seed", "teacher.seed", "data.synthetic", "model.net")


# ------------------------------------------------------------------------------------------------ evaluations


@dataclass(frozen=True)
class Eval:
    name: str  # the stage's directory and the prefix of its numbers ("knn_cls.top1")
    task: str
    probe: str | None  # knn | linear; None: fine-tuning
    label: str
    verdict_metrics: tuple[str, ...]  # the numbers the verdict rests on (metrics.final keys)


EVALS = {
    e.name: e
    for e in (
        Eval("knn_cls", "cls", "knn", "k-NN probe, classification", ("top1",)),
        Eval("linear_cls", "cls", "linear", "linear probe, classification", ("top1",)),
        Eval("linear_semseg", "semseg", "linear", "linear probe, segmentation", ("mIoU",)),
        Eval("linear_depth", "depth", "linear", "linear probe, depth", ("delta1", "abs_rel")),
        Eval("ft_cls", "cls", None, "fine-tuning, classification", ("top1",)),
        Eval("ft_semseg", "semseg", None, "fine-tuning, segmentation", ("mIoU",)),
        Eval("ft_depth", "depth", None, "fine-tuning, depth", ("delta1", "abs_rel")),
    )
}
EVAL_GROUPS = {
    "probe": [name for name, e in EVALS.items() if e.probe],
    "finetune": [name for name, e in EVALS.items() if not e.probe],
    "all": list(EVALS),
}
LOWER_IS_BETTER = frozenset({"abs_rel", "sq_rel", "rmse", "rmse_log", "log10"})
# Fine-tuning numbers of table3.json files written before the stages had names (docs/benchmarks/table3_mini_pilot.json).
LEGACY_KEYS = {"top1": "ft_cls.top1", "mIoU": "ft_semseg.mIoU", "delta1": "ft_depth.delta1"}


def higher_is_better(key: str) -> bool:
    return key.rsplit(".", 1)[-1] not in LOWER_IS_BETTER


# ------------------------------------------------------------------------------------------------ margins

MARGIN_K = 2.0
"""Margin = MARGIN_K x the full-data row's seed standard deviation in a pilot. One standard deviation is what a seed
change alone moves the baseline by, so it cannot be an important loss; the paired interval of a row no different from
full data reaches about t(0.975, n-1) x sqrt(2/n) ~ 1.8 of them below 0 at n = 5 when the pairing removes nothing,
so k = 1 would fail most equivalent rows; k = 2 still calls a loss of two baseline seed-spreads inferior."""

MARGINS: dict[str, dict[str, float | None]] = {
    # The full run's margins, fixed before it from the pilot (`python bench/table3.py --rows full scratch --jobs 2`,
    # seeds 0-4, full data at the shipped length; `--margins-from` on its table3.json): 2.0 x the full-data row's
    # seed standard deviation per metric. The pilot's runs are the full run's full-data and scratch rows.
    "shipped": {
        "knn_cls.top1": 10.2,  # 2.0 x std 5.088 (k-NN top-1 over seeds 0-4: 65.1 / 76.0 / 63.8 / 71.9 / 71.4)
        "linear_cls.top1": 2.56,  # 2.0 x std 1.281
        "linear_semseg.mIoU": 0.722,  # 2.0 x std 0.361
        "linear_depth.delta1": 2.52,  # 2.0 x std 1.258
        "linear_depth.abs_rel": 0.00843,  # 2.0 x std 0.004213 (lower is better: the row's high end must stay below)
    },
    # From the mini schedule's full-data row in docs/benchmarks/table3_mini_pilot.json (3 seeds, fine-tuning only; measured
    # before this rule existed): 2.0 x its seed std, `--margins-from docs/benchmarks/table3_mini_pilot.json`.
    "mini": {
        "ft_cls.top1": 12.4,  # 2.0 x 6.18 (top-1 46.9 / 58.9 / 55.5 over seeds 0 1 2)
        "ft_semseg.mIoU": 0.70,  # 2.0 x 0.350
        "ft_depth.delta1": 2.24,  # 2.0 x 1.12
    },
    # --quick is a pipeline check: no margins, so that nothing it prints reads as a result.
    "quick": {},
}


def margins_for(schedule: str) -> dict[str, float | None]:
    return dict(MARGINS.get(schedule, {}))


# ------------------------------------------------------------------------------------------------ statistics


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided t-interval; ``low``/``high``/``std`` are None with fewer than two values."""

    mean: float
    low: float | None
    high: float | None
    n: int
    std: float | None


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval | None:
    """mean -/+ t((1 + confidence) / 2, n - 1) * sd / sqrt(n) (sd with n - 1); None without values."""
    if not values:
        return None
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return Interval(mean, None, None, 1, None)
    std = statistics.stdev(values)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, std)


def paired(
    results: dict,
    row: str,
    seeds: Iterable[int],
    value: Callable[[dict], float | None],
    against: str = "full",
) -> list[tuple[float, float]]:
    """(row's value, the ``against`` row's value) for every seed that both finished and that has both values."""
    pairs = []
    for seed in seeds:
        run, base = results.get((row, seed)), results.get((against, seed))
        if run is None or base is None:
            continue
        x, y = value(run), value(base)
        if x is not None and y is not None:
            pairs.append((float(x), float(y)))
    return pairs


def paired_difference(pairs: list[tuple[float, float]]) -> Interval | None:
    return t_interval([x - y for x, y in pairs])


def paired_log_ratio(pairs: list[tuple[float, float]]) -> Interval | None:
    """The t-interval of ln(row / full) over seeds (see the module docstring for why logs)."""
    return t_interval([math.log(x / y) for x, y in pairs if x > 0 and y > 0])


def as_ratio(log_interval: Interval | None) -> dict | None:
    """A log-ratio interval as the geometric mean ratio and its interval's ends."""
    if log_interval is None:
        return None
    exp = lambda v: None if v is None else math.exp(v)  # noqa: E731
    return {
        "ratio": math.exp(log_interval.mean),
        "low": exp(log_interval.low),
        "high": exp(log_interval.high),
        "n": log_interval.n,
        "log_std": log_interval.std,
    }


def meets(difference: Interval | None, margin: float | None, higher_better: bool) -> bool | None:
    """Non-inferiority: the paired interval's worse end is inside the margin. None: undecided (no interval or
    no margin)."""
    if difference is None or difference.low is None or margin is None:
        return None
    return difference.low > -margin if higher_better else difference.high < margin


def is_faster(time_log_ratio: Interval | None) -> bool | None:
    """Time is lower-is-better with a margin of 0 on the log ratio: the ratio's interval lies below 1."""
    return meets(time_log_ratio, 0.0, higher_better=False)


def downstream_of(run: dict) -> dict[str, float]:
    """A run's downstream numbers by "stage.metric", also from table3.json files of the legacy format."""
    if "downstream" in run:
        return run["downstream"]
    return {new: run[old] for old, new in LEGACY_KEYS.items() if isinstance(run.get(old), (int, float))}


def derive_margins(runs: list[dict], k: float = MARGIN_K) -> dict[str, dict]:
    """Per downstream number: k x the full-data row's seed std in a pilot (metrics with two or more seeds).

    Also the pilot's pooled paired spread over the other rows it ran, when it ran any: with it,
    ``half_width_at_5`` is the paired interval's expected half-width at 5 seeds, to compare with the margin (a
    margin below it leaves an equivalent row little chance to meet)."""
    full = [r for r in runs if r.get("row") == "full"]
    out: dict[str, dict] = {}
    keys = sorted({key for run in full for key in downstream_of(run)})
    for key in keys:
        values = [downstream_of(r)[key] for r in full if downstream_of(r).get(key) is not None]
        if len(values) < 2:
            continue
        std = statistics.stdev(values)
        entry = {"margin": k * std, "std": std, "n": len(values), "k": k}
        by_seed = {r["seed"]: downstream_of(r)[key] for r in full if downstream_of(r).get(key) is not None}
        variances = []
        for name in sorted({r["row"] for r in runs} - {"full"}):
            diffs = [
                downstream_of(r)[key] - by_seed[r["seed"]]
                for r in runs
                if r["row"] == name and r["seed"] in by_seed and downstream_of(r).get(key) is not None
            ]
            if len(diffs) > 1:
                variances.append(statistics.variance(diffs))
        if variances:
            paired_std = math.sqrt(statistics.fmean(variances))
            entry["paired_std"] = paired_std
            entry["half_width_at_5"] = float(stats.t.ppf((1 + CONFIDENCE) / 2, 4)) * paired_std / math.sqrt(5)
        out[key] = entry
    return out


def format_margins(derived: dict[str, dict], source: str, schedule: str, k: float) -> str:
    lines = [
        f"# margins from {source}: {k} x the full-data row's seed std; paste into MARGINS[{schedule!r}] and "
        "docs/benchmarks.md before the full run",
        f"{schedule!r}: {{",
    ]
    for key, entry in derived.items():
        note = f"{entry['k']} x std {entry['std']:.4g} over {entry['n']} seeds"
        if "half_width_at_5" in entry:
            note += f"; pilot paired half-width at 5 seeds {entry['half_width_at_5']:.3g}"
        lines.append(f"    {key!r}: {entry['margin']:.3g},  # {note}")
    lines.append("},")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ sizes


@dataclass
class Sizes:
    """The fixed budget of every row: Hydra overrides for train.py and for each evaluation stage."""

    schedule: str = "mini"
    pretrain: list[str] = field(default_factory=list)
    evals: dict[str, list[str]] = field(default_factory=dict)
    epochs: int = 0
    warmup_epochs: float = 0.0


def compose(config: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from attent_vision.config import PRIMARY_CONFIG_DIRS  # importing it registers the config resolvers

    with initialize_config_dir(config_dir=str(PRIMARY_CONFIG_DIRS[config]), version_base="1.3"):
        return hydra_compose(config, overrides=[*overrides, f"paths.root_dir={ROOT}"])


def sizes_for(schedule: str, out: Path) -> Sizes:
    quick = schedule == "quick"
    if schedule == "shipped":
        pretrain: list[str] = []  # train.py's own length: what the project ships
        defaults = compose("train", [])
        epochs, warmup = int(defaults.trainer.max_epochs), float(defaults.model.warmup_epochs)
    else:
        # The mini schedule: 4 cycles with intervals 2..3, the default schedule's shape (10 cycles, intervals 5..10)
        # at a fifth of its length; quick: 2 cycles with intervals 1..2 in 6 epochs, the shortest that still has a
        # full epoch after each cycle's subsets.
        cycles, epochs, warmup, (first, last) = (2, 6, 1.0, (1, 2)) if quick else (4, 20, 2.0, (2, 3))
        pretrain = [
            f"selection.total_cycles={cycles}",
            f"interval.initial={first}",
            f"interval.max={last}",
            f"trainer.max_epochs={epochs}",
            f"model.warmup_epochs={warmup:g}",
        ]
    # The dense downstream sets are smaller than the embedded defaults (fine-tuning would dominate otherwise) and
    # live under --out, so the benchmark never rewrites the project's data folder.
    dense = [f"data.root={out / 'data' / 'nyu'}", "data.synthetic.create=true"] + (
        ["data.synthetic.num_train=128", "data.synthetic.num_eval=96"]
        if quick
        else ["data.synthetic.num_train=192", "data.synthetic.num_eval=128"]
    )
    # A few epochs must separate the encoders: validation only after the last epoch, and for classification a
    # short recipe (no Mixup/CutMix, 10x the base LR, no layer decay) instead of the 20-epoch regularised one.
    ft_epochs = {"cls": 2, "semseg": 1, "depth": 1} if quick else {"cls": 4, "semseg": 4, "depth": 4}
    fast_cls = ["module.mixup=0", "module.cutmix=0", "module.blr=5e-3", "module.layer_decay=null"]
    evals = {}
    for name, stage in EVALS.items():
        data = dense if stage.task != "cls" else []
        if stage.probe is None:
            recipe = fast_cls if stage.task == "cls" else []
            evals[name] = [
                f"trainer.max_epochs={ft_epochs[stage.task]}",
                "trainer.check_val_every_n_epoch=1000",
                *recipe,
                *data,
            ]
        else:
            # The probes' own recipes (attent_vision/conf/finetune/probe): one feature pass per split, then seconds of head training.
            evals[name] = list(data)
    return Sizes(schedule=schedule, pretrain=pretrain, evals=evals, epochs=epochs, warmup_epochs=warmup)


# ------------------------------------------------------------------------------------------------ command lines


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def refuse_seed_overrides(overrides: Sequence[str]) -> None:
    touched = [o for o in overrides if override_key(o) in SEED_KEYS]
    if touched:
        raise RunFailed(
            f"a row may not set a seed (the pairing with full data needs the same one): {touched}"
        )


def pretrain_args(overrides: Sequence[str], seed: int, sizes: Sizes, run_dir: Path) -> list[str]:
    refuse_seed_overrides(overrides)
    return [
        *sizes.pretrain,
        *overrides,
        f"hydra.run.dir={run_dir}",
        "resume=restart",
        "trainer.enable_progress_bar=false",
        "~callbacks.reconstructions",
        "~callbacks.selection_gallery",
        f"seed={seed}",
    ]


def eval_args(stage: Eval, pretrained: Path | None, seed: int, sizes: Sizes, run_dir: Path) -> list[str]:
    # resume=restart: a stage interrupted in an earlier invocation runs whole again, so its costs are one run's.
    return [
        f"task={stage.task}",
        *([f"probe={stage.probe}"] if stage.probe else []),
        *sizes.evals[stage.name],
        f"hydra.run.dir={run_dir}",
        "resume=restart",
        "write_downstream=false",
        "trainer.enable_progress_bar=false",
        f"pretrained={pretrained if pretrained else 'null'}",
        f"seed={seed}",
    ]


# Hydra's state is global: one composition at a time (controls compose in the runner's threads).
_COMPOSE_LOCK = threading.Lock()


def seed_fingerprint(row_overrides: Sequence[str], seed: int, sizes: Sizes) -> dict:
    """What of the composed train.py config decides init and data order (:data:`SAME_AS_FULL`)."""
    from omegaconf import OmegaConf

    refuse_seed_overrides(row_overrides)
    with _COMPOSE_LOCK:
        # The order of pretrain_args: the schedule, the row, the seed last.
        cfg = compose("train", [*sizes.pretrain, *row_overrides, f"seed={seed}"])
    fingerprint = {}
    for key in SAME_AS_FULL:
        node = OmegaConf.select(cfg, key)  # resolved in place: model.net interpolates data.* keys
        fingerprint[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return fingerprint


def check_same_seed(overrides_by_row: dict[str, Sequence[str]], seed: int, sizes: Sizes) -> None:
    """Raises unless every row's composed config gives the full-data row's seeds, data and network for ``seed``."""
    reference = seed_fingerprint(FULL.overrides, seed, sizes)
    if reference["seed"] != seed:
        raise RunFailed(f"seed={seed} does not reach the config (it holds {reference['seed']})")
    for name, overrides in overrides_by_row.items():
        fingerprint = seed_fingerprint(overrides, seed, sizes)
        differ = [k for k in SAME_AS_FULL if fingerprint[k] != reference[k]]
        if differ:
            raise RunFailed(f"row {name}, seed {seed}: {differ} differ from the full-data row's")


# ------------------------------------------------------------------------------------------------ running


class RunFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class ChildCost:
    returncode: int
    wall_s: float  # the process's life, interpreter start-up included
    cpu_s: float  # user + system of the child and every descendant it waited for
    user_s: float
    system_s: float


def machine() -> str:
    """What a wall time depends on: the CPU model, its core count, and whether it computes bf16 natively."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from attent_vision.config import cpu_has_native_bf16

    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"{model}, {os.cpu_count()} cores, {bf16}"


def run_child(command: list[str], log: Path, env: dict | None = None) -> ChildCost:
    """Runs ``command`` with its output in ``log`` and measures its CPU time with ``os.wait4``: the rusage of that
    one child (and what it reaped), unlike RUSAGE_CHILDREN deltas, which a parallel run's exit would contaminate."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=out, cwd=ROOT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return ChildCost(
        proc.returncode,
        round(time.perf_counter() - start, 3),
        round(usage.ru_utime + usage.ru_stime, 3),
        round(usage.ru_utime, 3),
        round(usage.ru_stime, 3),
    )


def run_script(script: str, args: list[str], log: Path, threads: int) -> ChildCost:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline", "OMP_NUM_THREADS": str(threads)}
    cost = run_child([sys.executable, str(ROOT / script), *args], log, env)
    if cost.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RunFailed(f"{script} {' '.join(args)} failed (exit {cost.returncode}); log {log}:\n{tail}")
    return cost


def finished(run_dir: Path, statuses: tuple[str, ...] = ("finished",)) -> dict | None:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("status") in statuses else None


def read_cost(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # finished by a version that did not measure costs


def subset_epochs(history: list[dict]) -> int:
    """Epochs that trained fewer samples than a full epoch (``samples_seen`` is cumulative in the history)."""
    seen = [h["samples_seen"] for h in history]
    per_epoch = [b - a for a, b in zip([0, *seen], seen, strict=False)]
    return sum(n < max(per_epoch) for n in per_epoch)


def training_set_size(run_dir: Path) -> int | None:
    """The size a full scoring pass runs over: the run's ``data.synthetic.num_train`` (Hydra's saved config)."""
    try:
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        size = (config.get("data") or {}).get("synthetic", {}).get("num_train")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return int(size) if isinstance(size, int) else None


def pretrain_numbers(summary: dict, run_dir: Path, cost: dict) -> dict:
    passes = summary.get("scoring_passes") or 0
    size = training_set_size(run_dir)
    return {
        "pretrain_dir": str(run_dir),
        "pretrain_time_s": summary["wall_time_s"],
        "process_wall_s": cost.get("wall_s"),
        "cpu_s": cost.get("cpu_s"),
        "machine": cost.get("machine"),
        "threads": cost.get("threads"),
        "samples_seen": summary["samples_seen"],
        "optimizer_steps": summary.get("optimizer_steps"),
        "scoring_passes": passes,
        # Not recorded by the teacher: a full pass forwards every training sample once (one process here; DDP
        # pads the last shard by at most world_size - 1).
        "scoring_forward_samples": 0 if passes == 0 else (passes * size if size is not None else None),
        "scoring_time_s": summary.get("scoring_time_s") or 0.0,
        "final_val_loss": summary.get("final_val_loss"),
        "subset_epochs": subset_epochs(summary.get("history") or []),
    }


def eval_numbers(stage: Eval, summary: dict, cost: dict) -> dict:
    """A stage's numbers from its summary.json: every numeric ``metrics.final`` entry and chance level, keyed
    ``<stage>.<metric>``, and its costs."""
    final = (summary.get("metrics") or {}).get("final") or {}
    chance = summary.get("chance") or {}
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    return {
        "downstream": {f"{stage.name}.{k}": float(v) for k, v in final.items() if number(v)},
        "chance": {f"{stage.name}.{k}": float(v) for k, v in chance.items() if number(v)},
        "cost": {
            "wall_time_s": summary.get("wall_time_s"),
            "process_wall_s": cost.get("wall_s"),
            "cpu_s": cost.get("cpu_s"),
        },
    }


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


def run_row(
    row: Row, seed: int, out: Path, sizes: Sizes, stages: list[Eval], results: dict, threads: int
) -> dict:
    """Pretrains (unless scratch) and evaluates one (row, seed), reusing whatever already finished."""
    job = out / row.name / f"seed{seed}"
    job.mkdir(parents=True, exist_ok=True)
    result: dict = {"row": row.name, "seed": seed, "downstream": {}, "chance": {}, "evals": {}}
    pretrained, pretrained_now = None, False
    if row.pretrains:
        overrides = (
            list(row.overrides) if row.control is None else control_overrides(row, seed, results, sizes)
        )
        if row.control is not None:
            check_same_seed({row.name: overrides}, seed, sizes)
        pretrained = job / "pretrain"
        summary = finished(pretrained)
        if summary is None:
            args = pretrain_args(overrides, seed, sizes, pretrained)
            cost = run_script("train.py", args, job / "pretrain.log", threads)
            summary = finished(pretrained)
            if summary is None:
                raise RunFailed(f"{pretrained}/summary.json does not say finished")
            (job / "pretrain.cost.json").write_text(
                json.dumps({**asdict(cost), "machine": machine(), "threads": threads})
            )
            pretrained_now = True
        result["overrides"] = overrides
        result.update(pretrain_numbers(summary, pretrained, read_cost(job / "pretrain.cost.json")))
    for stage in stages:
        stage_dir = job / stage.name
        # An evaluation of an encoder that was just pretrained again is stale, whatever its summary says.
        summary = None if pretrained_now else finished(stage_dir, ("finished", "evaluated"))
        if summary is None:
            args = eval_args(stage, pretrained, seed, sizes, stage_dir)
            cost = run_script("finetune.py", args, job / f"{stage.name}.log", threads)
            summary = finished(stage_dir, ("finished", "evaluated"))
            if summary is None:
                raise RunFailed(f"{stage_dir}/summary.json does not say finished")
            (job / f"{stage.name}.cost.json").write_text(
                json.dumps({**asdict(cost), "machine": machine(), "threads": threads})
            )
        numbers = eval_numbers(stage, summary, read_cost(job / f"{stage.name}.cost.json"))
        result["downstream"].update(numbers["downstream"])
        result["chance"].update(numbers["chance"])
        result["evals"][stage.name] = numbers["cost"]
    return result


def run_all(
    rows: list[Row], seeds: list[int], out: Path, sizes: Sizes, stages: list[Eval], jobs: int, threads: int
) -> dict:
    """Runs every (row, seed), ``jobs`` at a time, seed-major (an interrupted benchmark has whole seeds); a control
    starts once the rows it is matched to finished."""
    first = ["full", DEFAULT_ROW, "scratch"]  # the pairs' reference and the controls' inputs first
    order = sorted(rows, key=lambda r: (r.control is not None, first.index(r.name) if r.name in first else 3))
    pending = [(row, seed) for seed in seeds for row in order]
    results: dict[tuple[str, int], dict] = {}

    def ready(row: Row, seed: int) -> bool:
        return row.control is None or all((name, seed) in results for name in ("full", DEFAULT_ROW))

    def run(row: Row, seed: int) -> tuple[tuple[str, int], dict]:
        t0 = time.perf_counter()
        result = run_row(row, seed, out, sizes, stages, results, threads)
        brief = {k: v for k, v in result.items() if k not in ("chance", "evals")}
        print(json.dumps({**brief, "bench_s": round(time.perf_counter() - t0, 1)}), flush=True)
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


def prepare_data(sizes: Sizes, stages: list[Eval]) -> None:
    """Writes the embedded pretraining and downstream sets first, through the data modules' own prepare_data: runs
    side by side would otherwise race to write them, and no run's time should include writing them."""
    from hydra.utils import instantiate

    configs = [compose("train", sizes.pretrain)]
    # One per task: the probes and fine-tuning of a task read the same data (the probe group is left out, so that
    # this also works before it exists).
    for task in sorted({s.task for s in stages}):
        stage = next(s for s in stages if s.task == task)
        data = [o for o in sizes.evals[stage.name] if o.startswith("data.")]
        configs.append(compose("finetune", [f"task={task}", *data]))
    for cfg in configs:
        instantiate(cfg.data).prepare_data()


# ------------------------------------------------------------------------------------------------ the table

COST_KEYS = (
    "pretrain_time_s",
    "cpu_s",
    "samples_seen",
    "optimizer_steps",
    "scoring_passes",
    "scoring_forward_samples",
    "scoring_time_s",
    "final_val_loss",
)


def mean_std(values: list[float]) -> dict | None:
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def row_statistics(row: Row, results: dict, seeds: list[int], margins: dict[str, float | None]) -> dict:
    """One row's numbers: costs (mean, std; time and CPU as paired ratios) and every downstream number (mean, std,
    paired difference to full data with its interval, margin, meets)."""
    runs = [results[(row.name, s)] for s in seeds if (row.name, s) in results]
    out: dict = {
        "row": row.name,
        "method": row.method,
        "seeds": [r["seed"] for r in runs],
        "costs": {},
        "downstream": {},
    }
    if row.pretrains:
        for key in COST_KEYS:
            out["costs"][key] = mean_std([r[key] for r in runs if r.get(key) is not None])
        if row.name != "full":
            for key, name in (("pretrain_time_s", "time_ratio"), ("cpu_s", "cpu_ratio")):
                log_ratio = paired_log_ratio(paired(results, row.name, seeds, lambda r, k=key: r.get(k)))
                out[name] = as_ratio(log_ratio)
                if key == "pretrain_time_s":
                    out["faster"] = is_faster(log_ratio)
    keys = sorted({key for r in runs for key in r["downstream"]})
    for key in keys:
        values = [r["downstream"][key] for r in runs if key in r["downstream"]]
        entry = {**mean_std(values), "higher_is_better": higher_is_better(key), "margin": margins.get(key)}
        if row.name != "full":
            difference = paired_difference(
                paired(results, row.name, seeds, lambda r, k=key: r["downstream"].get(k))
            )
            entry["difference"] = asdict(difference) if difference else None
            entry["meets"] = meets(difference, entry["margin"], entry["higher_is_better"])
        out["downstream"][key] = entry
    return out


def chance_levels(results: dict) -> dict[str, float]:
    """The chance level of every number that has one, over all runs (the evaluation splits are fixed, so every run
    reports the same)."""
    levels: dict[str, list[float]] = {}
    for run in results.values():
        for key, value in run.get("chance", {}).items():
            levels.setdefault(key, []).append(value)
    return {key: statistics.fmean(values) for key, values in sorted(levels.items())}


def spec_for(key: str) -> str:
    return ".4f" if not higher_is_better(key) else ".2f"


def fmt_mean_std(entry: dict | None, spec: str) -> str:
    if not entry:
        return "–"
    return f"{entry['mean']:{spec}}" + (f" ± {entry['std']:{spec}}" if entry.get("std") is not None else "")


def fmt_difference(entry: dict, spec: str) -> str:
    d = entry.get("difference")
    if not d:
        return "–"
    if d["low"] is None:
        return f"{d['mean']:+{spec}} (n=1)"
    return f"{d['mean']:+{spec}} [{d['low']:+{spec}}, {d['high']:+{spec}}]"


def fmt_ratio(ratio: dict | None) -> str:
    if not ratio:
        return "–"
    if ratio["low"] is None:
        return f"{ratio['ratio']:.3f}× (n=1)"
    return f"{ratio['ratio']:.3f}× [{ratio['low']:.3f}, {ratio['high']:.3f}]"


def fmt_meets(value: bool | None, margin: float | None) -> str:
    if margin is None:
        return "no margin"
    return {True: "**meets**", False: "misses", None: "undecided (< 2 seeds)"}[value]


def verdict_keys(stages: list[Eval]) -> list[str]:
    """The numbers the verdict rests on: the probes' when any probe ran, else fine-tuning's."""
    chosen = [s for s in stages if s.probe] or stages
    return [f"{s.name}.{m}" for s in chosen for m in s.verdict_metrics]


def costs_table(rows: list[Row], by_row: dict[str, dict]) -> list[str]:
    lines = [
        "| method | ratio | interval | scoring | seeds | pretraining time (s) | time ÷ full (paired) | CPU (s) | "
        "CPU ÷ full (paired) | samples trained | optimizer steps | scoring passes | scoring forward samples | "
        "val loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    full = by_row.get("full", {}).get("costs", {})

    def count(costs: dict, key: str) -> str:
        entry = costs.get(key)
        if not entry:
            return "–"
        base = full.get(key)
        share = f" ({entry['mean'] / base['mean']:.3f}×)" if base and base["mean"] else ""
        return f"{entry['mean']:.0f}{share}"

    for row in rows:
        stats_ = by_row.get(row.name)
        if stats_ is None:
            continue
        c = stats_["costs"]
        if not row.pretrains:
            lines.append(
                f"| {row.method} (`{row.name}`) | – | – | – | {len(stats_['seeds'])} | none | – | – | – | 0 | 0 | – | – | – |"
            )
            continue
        lines.append(
            f"| {row.method} (`{row.name}`) | {row.ratio} | {row.interval} | {row.scoring} | {len(stats_['seeds'])} | "
            f"{fmt_mean_std(c.get('pretrain_time_s'), '.1f')} | {fmt_ratio(stats_.get('time_ratio'))} | "
            f"{fmt_mean_std(c.get('cpu_s'), '.1f')} | {fmt_ratio(stats_.get('cpu_ratio'))} | "
            f"{count(c, 'samples_seen')} | {count(c, 'optimizer_steps')} | {fmt_mean_std(c.get('scoring_passes'), '.0f')} | "
            f"{count(c, 'scoring_forward_samples')} | {fmt_mean_std(c.get('final_val_loss'), '.4f')} |"
        )
    return lines


def verdict_table(rows: list[Row], by_row: dict[str, dict], keys: list[str], chance: dict) -> list[str]:
    head = [f"{k} ({'↑' if higher_is_better(k) else '↓'})" for k in keys]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(keys)]
    for row in rows:
        stats_ = by_row.get(row.name)
        if stats_ is None:
            continue
        cells = []
        for key in keys:
            entry = stats_["downstream"].get(key)
            if entry is None:
                cells.append("–")
                continue
            cell = fmt_mean_std(entry, spec_for(key))
            if row.name != "full":
                cell += (
                    f"; Δ {fmt_difference(entry, spec_for(key))} {fmt_meets(entry['meets'], entry['margin'])}"
                )
            cells.append(cell)
        lines.append(f"| {row.method} (`{row.name}`) | " + " | ".join(cells) + " |")
    lines.append(
        "| chance | " + " | ".join(f"{chance[k]:{spec_for(k)}}" if k in chance else "–" for k in keys) + " |"
    )
    return lines


def every_number_table(rows: list[Row], by_row: dict[str, dict], chance: dict) -> list[str]:
    lines = [
        "| number | better | margin | method | seeds | mean ± std | Δ vs full data, paired [95% CI] | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({k for s in by_row.values() for k in s["downstream"]})
    for key in keys:
        spec = spec_for(key)
        better = "higher" if higher_is_better(key) else "lower"
        for row in rows:
            entry = by_row.get(row.name, {}).get("downstream", {}).get(key)
            if entry is None:
                continue
            margin = "–" if entry["margin"] is None else f"{entry['margin']:{spec}}"
            verdict = "" if row.name == "full" else fmt_meets(entry.get("meets"), entry["margin"])
            lines.append(
                f"| {key} | {better} | {margin} | {row.method} (`{row.name}`) | {entry['n']} | {fmt_mean_std(entry, spec)} | "
                f"{fmt_difference(entry, spec)} | {verdict} |"
            )
        if key in chance:
            lines.append(f"| {key} | {better} | | chance | | {chance[key]:{spec}} | | |")
    return lines


def against_random(
    rows: list[Row], results: dict, seeds: list[int], keys: list[str]
) -> tuple[list[str], dict]:
    """Whether the difficulty prior helps: each difficulty-aware row against random selection on the same schedule,
    paired by seed (row − random, mean [95% t-interval]; time as the paired ratio). Empty without a random row."""
    present = {name for name, _ in results} & {row.name for row in rows}
    if "random" not in present:
        return [], {}
    head = [f"Δ {k} ({'↑' if higher_is_better(k) else '↓'})" for k in keys]
    lines = [
        "| method | time ÷ random (paired) | " + " | ".join(head) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    numbers: dict[str, dict] = {}
    for row in rows:
        if row.name not in DEFAULT_CANDIDATES or row.name not in present:
            continue
        time_ratio = as_ratio(
            paired_log_ratio(paired(results, row.name, seeds, lambda r: r.get("pretrain_time_s"), "random"))
        )
        entry: dict = {"time_ratio": time_ratio}
        cells = []
        for key in keys:
            difference = paired_difference(
                paired(results, row.name, seeds, lambda r, k=key: r["downstream"].get(k), "random")
            )
            entry[key] = asdict(difference) if difference else None
            if difference is None:
                cells.append("–")
                continue
            cell = fmt_difference({"difference": entry[key]}, spec_for(key))
            if difference.low is not None:
                better = difference.low > 0 if higher_is_better(key) else difference.high < 0
                worse = difference.high < 0 if higher_is_better(key) else difference.low > 0
                cell += " better" if better else " worse" if worse else " (not resolved)"
            cells.append(cell)
        numbers[row.name] = entry
        lines.append(f"| {row.method} (`{row.name}`) | {fmt_ratio(time_ratio)} | " + " | ".join(cells) + " |")
    return lines, numbers


def verdict(rows: list[Row], by_row: dict[str, dict], keys: list[str]) -> tuple[str, dict]:
    """The rule for the default: the fastest of :data:`DEFAULT_CANDIDATES` that meets every verdict number's margin
    and whose time ratio's interval lies below 1."""
    lines, passing, undecided = [], [], []
    for row in rows:
        stats_ = by_row.get(row.name)
        if stats_ is None or row.name == "full":
            continue
        outcomes = [stats_["downstream"].get(k, {}).get("meets") for k in keys]
        faster = stats_.get("faster") if row.pretrains else True  # scratch costs no pretraining time
        # One definite miss decides; "meets" needs every number and the time decided in the row's favour.
        if False in outcomes or faster is False:
            state = "misses"
        elif all(o is True for o in outcomes) and faster:
            state = "meets"
        else:
            state = "undecided"
        if row.name in DEFAULT_CANDIDATES:
            if state == "meets":
                passing.append((stats_["time_ratio"]["ratio"], row.name))
            elif state == "undecided":
                undecided.append(row.name)
        parts = [
            f"{k} "
            + (
                fmt_meets(o, stats_["downstream"][k]["margin"])
                if k in stats_["downstream"]
                else "not measured"
            )
            for k, o in zip(keys, outcomes, strict=True)
        ]
        if row.pretrains:
            faster = stats_.get("faster")
            parts.insert(
                0,
                f"time {fmt_ratio(stats_.get('time_ratio'))}, "
                f"{'faster' if faster else 'not shown faster' if faster is False else 'undecided'}",
            )
        role = "" if row.name in DEFAULT_CANDIDATES else " (yardstick, never the default)"
        lines.append(f"- {row.name}{role}: " + "; ".join(parts) + f" -> {state}")
    if not lines:
        return "no row besides full data", {"default": None, "undecided": []}
    best = min(passing) if passing else None
    if best:
        high = by_row[best[1]]["time_ratio"]["high"]
        lines.append(
            f"\nfastest teacher setting meeting the rule: {best[1]} ({best[0]:.3f}×, interval up to "
            f"{high:.3f}×; the {TIME_TARGET:.2f}× target {'reached' if high <= TIME_TARGET else 'not shown'})"
        )
    if undecided:
        lines.append(
            f"{'' if best else chr(10)}undecided: {', '.join(undecided)} (a margin not fixed, a number not "
            "measured or fewer than 2 seeds): no verdict about them"
        )
    if not best and not undecided:
        lines.append("\nno setting meets the rule")
    return "\n".join(lines), {"default": best[1] if best else None, "undecided": undecided}


def summarise(
    rows: list[Row], seeds: list[int], results: dict, stages: list[Eval], margins: dict[str, float | None]
) -> tuple[str, dict]:
    """The markdown body (three tables and the verdict) and the statistics for table3.json."""
    by_row = {
        row.name: row_statistics(row, results, seeds, margins)
        for row in rows
        if any((row.name, s) in results for s in seeds)
    }
    chance = chance_levels(results)
    keys = verdict_keys(stages)
    rule, decision = verdict(rows, by_row, keys)
    random_lines, versus_random = against_random(rows, results, seeds, keys)
    if random_lines:
        random_lines = [
            "Against random selection on the same schedule (does the difficulty prior help? row − random on the "
            "same seed, mean [95% t-interval]; 'better'/'worse' only where the interval excludes 0):",
            "",
            *random_lines,
            "",
        ]
    text = "\n".join(
        [
            "Costs (mean ± std over seeds; ratios: geometric mean of the paired ratios to full data [95% t-interval]; "
            "counts: mean (÷ full data)):",
            "",
            *costs_table(rows, by_row),
            "",
            "Verdict numbers (mean ± std; Δ = row − full data on the same seed, mean [95% t-interval]; the margin "
            "rule as in the docstring):",
            "",
            *verdict_table(rows, by_row, keys, chance),
            "",
            "Verdict:",
            rule,
            "",
            *random_lines,
            "Every downstream number:",
            "",
            *every_number_table(rows, by_row, chance),
        ]
    )
    return text, {
        "rows": by_row,
        "chance": chance,
        "verdict_keys": keys,
        "verdict": decision,
        "against_random": versus_random,
    }


def plot(rows: list[Row], summary: dict, results: dict, seeds: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attent_vision.tools.report.collect import load_job, loss_curve

    colours = {row.name: plt.get_cmap("tab20")(i % 20) for i, row in enumerate(rows)}
    markers = {row.name: "osD^v<>ph*XP"[i % 12] for i, row in enumerate(rows)}
    keys = summary["verdict_keys"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for row in rows:
            stats_ = summary["rows"].get(row.name)
            entry = stats_ and stats_["downstream"].get(key)
            ratio = stats_ and stats_.get("time_ratio")
            if not entry or not entry.get("difference") or not ratio:
                continue
            d = entry["difference"]
            yerr = [[d["mean"] - d["low"]], [d["high"] - d["mean"]]] if d["low"] is not None else None
            xerr = (
                [[ratio["ratio"] - ratio["low"]], [ratio["high"] - ratio["ratio"]]]
                if ratio["low"] is not None
                else None
            )
            ax.errorbar(
                ratio["ratio"],
                d["mean"],
                xerr=xerr,
                yerr=yerr,
                fmt=markers[row.name],
                color=colours[row.name],
                capsize=3,
                label=row.name,
            )
        margin = summary["rows"].get("full", {}).get("downstream", {}).get(key, {}).get("margin")
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(1, color="grey", lw=0.8)
        if margin is not None:
            ax.axhline(
                -margin if higher_is_better(key) else margin, color="red", ls="--", lw=0.8, label="margin"
            )
        ax.set(xlabel="time ÷ full data (paired)", ylabel=f"Δ {key} vs full data", title=key)
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:  # no paired point yet (one seed, or the full row alone)
        axes[0][0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(out / "paired_vs_time.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        run = results.get((row.name, seeds[0]))
        if run is None or "pretrain_dir" not in run:
            continue
        times, losses = loss_curve(load_job(Path(run["pretrain_dir"])))
        style = "--" if row.control else "-"
        ax.plot(times, losses, style, marker=".", color=colours[row.name], label=row.name)
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


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--schedule",
        choices=["shipped", "mini"],
        help="pretraining length: train.py's default (shipped, the default) or the 20-epoch miniature",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="pipeline check: tiny mini schedule, full + soft + scratch, seeds 0 1, --jobs 2",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 3 4 (--quick: 0 1)")
    parser.add_argument("--rows", nargs="+", choices=list(ALL_ROWS), help="default: the schedule's rows")
    parser.add_argument(
        "--evals",
        nargs="+",
        choices=[*EVAL_GROUPS, *EVALS],
        default=["probe"],
        help="evaluation stages: probe (default), finetune, all, or stage names",
    )
    parser.add_argument(
        "--pretrain-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="train.py overrides added to every pretraining run (a candidate learner setting, e.g. "
        "model.blr=3e-3); seeds are refused",
    )
    parser.add_argument("--out", type=Path, help="default: outputs/bench/table3[_<schedule>]")
    parser.add_argument(
        "--jobs",
        type=int,
        help="runs at a time, cores/jobs threads each (default 1: wall times without a neighbour; "
        "--quick: 2)",
    )
    parser.add_argument(
        "--margins-from",
        type=Path,
        metavar="TABLE3_JSON",
        help="print the margins a pilot's full-data seed spread gives, and exit",
    )
    parser.add_argument(
        "--margin-k", type=float, default=MARGIN_K, help=f"with --margins-from (default {MARGIN_K})"
    )
    args = parser.parse_args(argv)
    if args.quick and args.schedule:
        parser.error("--quick has its own tiny schedule: leave --schedule out")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.margins_from:
        pilot = json.loads(args.margins_from.read_text())
        derived = derive_margins(pilot["runs"], args.margin_k)
        schedule = (pilot.get("settings") or {}).get("schedule", args.schedule or "shipped")
        print(format_margins(derived, str(args.margins_from), schedule, args.margin_k))
        return
    schedule = "quick" if args.quick else args.schedule or "shipped"
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2, 3, 4])
    names = args.rows or SCHEDULE_ROWS[schedule]
    rows = [row for name, row in ALL_ROWS.items() if name in names]
    stage_names = [n for choice in args.evals for n in EVAL_GROUPS.get(choice, [choice])]
    stages = [EVALS[n] for n in EVALS if n in stage_names]
    out = args.out or ROOT / "outputs" / "bench" / (
        "table3" if schedule == "shipped" else f"table3_{schedule}"
    )
    out.mkdir(parents=True, exist_ok=True)
    sizes = sizes_for(schedule, out)
    refuse_seed_overrides(args.pretrain_set)
    sizes.pretrain.extend(args.pretrain_set)
    margins = margins_for(schedule)
    jobs = args.jobs or (2 if args.quick else 1)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # Before any run: every row's config must give the full-data row's seeds, data and network (controls are
    # checked when their overrides are known).
    for seed in seeds:
        check_same_seed({r.name: r.overrides for r in rows if r.pretrains and r.control is None}, seed, sizes)
    prepare_data(sizes, stages)
    start = time.perf_counter()
    results = run_all(rows, seeds, out, sizes, stages, jobs, threads)
    body, summary = summarise(rows, seeds, results, stages, margins)
    stage_s = sum(
        read_cost(path).get("wall_s") or 0.0
        for row in rows
        for seed in seeds
        for path in (out / row.name / f"seed{seed}").glob("*.cost.json")
    )
    header = (
        f"Table 3, {schedule} schedule, seeds {seeds}, evaluations {[s.name for s in stages]}, {jobs} run(s) at a "
        f"time with {threads} thread(s) each. Pretraining overrides: {' '.join(sizes.pretrain) or 'none (train.py defaults)'}; "
        f"evaluations: {json.dumps({s.name: sizes.evals[s.name] for s in stages})}. Margins (fixed before the run, "
        f"{MARGIN_K} x a pilot's full-data seed std): {json.dumps(margins)}. This invocation took "
        f"{time.perf_counter() - start:.0f} s; the runs' stages took {stage_s:.0f} s in all ({jobs} at a time; "
        "stages finished by an earlier invocation are reused, not rerun)."
    )
    measured_on = sorted(
        {
            f"{r.get('machine')} ({r.get('threads')} thread(s))"
            for r in results.values()
            if r.get("pretrain_dir")
        }
    )
    if len(measured_on) > 1:
        header += f" **The pretraining runs were measured on different machines or thread counts**: {measured_on}; compare their times with care."
    elif measured_on:
        header += f" Pretraining measured on: {measured_on[0]}."
    (out / "table3.md").write_text(f"{header}\n\n{body}\n")
    settings = {
        "schedule": schedule,
        "seeds": seeds,
        "rows": [r.name for r in rows],
        "evals": [s.name for s in stages],
        "jobs": jobs,
        "threads": threads,
        "confidence": CONFIDENCE,
        "margin_k": MARGIN_K,
        "margins": margins,
        "pretrain": sizes.pretrain,
        "eval_overrides": {s.name: sizes.evals[s.name] for s in stages},
    }
    (out / "table3.json").write_text(
        json.dumps({"settings": settings, "runs": list(results.values()), **summary}, indent=1)
    )
    plot(rows, summary, results, seeds, out)
    print(
        f"\n{header}\n\n{body}\n\nwrote {out}/table3.md, table3.json, paired_vs_time.png, val_loss_vs_time.png"
    )


if __name__ == "__main__":
    main()
