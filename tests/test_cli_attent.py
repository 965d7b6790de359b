"""AtteNT from the command line: the printed plan, start-up errors, and the ablation sweep with its report.

The plan and the start-up checks run in-process (the composed config through ``run_pretraining``, as train.py
calls it); one test per path goes through the real command line: the printed plan, and a start-up error as one
message without a traceback.
"""

import json
import subprocess
import sys

import pytest

from attent_vision.config import ConfigError
from attent_vision.runs.pretrain import run_pretraining
from tests.conftest import ROOT, read_summary, run_train

PLAN_KEYS = {"epoch", "kind", "cycle", "ratio", "num_samples", "num_steps", "reselect"}


@pytest.fixture
def printed_plan(compose_cfg, capsys, tmp_path, monkeypatch):
    """``python train.py print_plan=true ARGS`` in-process: the JSON plan it prints, data and outputs in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATTENT_DATA_DIR", str(tmp_path / "data"))

    def plan_of(args: list[str]) -> list[dict]:
        capsys.readouterr()
        assert run_pretraining(compose_cfg("print_plan=true", *args)) is None
        return json.loads(capsys.readouterr().out)

    return plan_of


@pytest.mark.slow
def test_print_plan_from_the_command_line_prints_json_and_generates_no_data(tmp_path, printed_plan):
    proc = run_train(["print_plan=true"], cwd=tmp_path)
    assert json.loads(proc.stdout) == printed_plan([])
    assert not (tmp_path / "data").exists(), "printing the plan must not generate data"


def test_default_plan_is_incremental_soft_with_every_epoch_accounted_for(tmp_path, printed_plan):
    plan = printed_plan([])
    assert not (tmp_path / "data").exists(), "printing the plan must not generate data"
    assert len(plan) == 100 and all(set(p) == PLAN_KEYS for p in plan)
    assert [p["epoch"] for p in plan] == list(range(100))
    assert plan[0] == {
        "epoch": 0,
        "kind": "full",
        "cycle": None,
        "ratio": 1.0,
        "num_samples": 256,
        "num_steps": 8,
        "reselect": False,
    }
    subset = [p for p in plan if p["kind"] == "subset"]
    assert len(subset) == sum([5, 5, 6, 6, 7, 7, 8, 8, 9, 10])
    ratios = sorted({round(p["ratio"], 3) for p in subset})
    assert ratios == [0.2, 0.267, 0.333, 0.4, 0.467, 0.533, 0.6, 0.667, 0.733, 0.8]
    assert all(p["reselect"] for p in subset)  # soft re-draws before every subset epoch, as the reference
    assert {p["cycle"] for p in plan if p["cycle"] is not None} == set(range(10))


def test_plan_follows_the_chosen_groups(printed_plan):
    plan = printed_plan(["selection=hard", "ratio=cosine", "interval=fixed", "trainer.max_epochs=61"])
    assert len(plan) == 61
    firsts = [p for p in plan if p["reselect"]]
    assert len(firsts) == 10  # hard re-selects once per cycle
    assert [round(p["ratio"], 3) for p in firsts] == [
        0.2,
        0.218,
        0.27,
        0.35,
        0.448,
        0.552,
        0.65,
        0.73,
        0.782,
        0.8,
    ]
    assert sum(p["kind"] == "subset" for p in plan) == 50
    none = printed_plan(["selection=none"])
    assert all(p["kind"] == "full" and not p["reselect"] for p in none)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=50", "trainer.max_epochs: 50 epochs cannot hold selection.total_cycles=10"),
        ("ratio.initial=1.5", "ratio.initial: 1.5 is outside (0, 1]"),
        ("ratio.final=0.1", "ratio.final: 0.1 is below ratio.initial=0.2"),
        ("interval.initial=0", "interval.initial: 0 must be >= 1"),
        ("selection.temperature=0", "selection.temperature: 0 must be > 0"),
        ("scoring.batch_size=0", "scoring.batch_size: 0 must be >= 1"),
        ("selection.normalization=relu", "selection.normalization: unknown 'relu'"),
        ("selection.reselect=always", "selection.reselect: unknown 'always'; allowed: cycle, every"),
        ("scoring.refresh=never", "scoring.refresh: unknown 'never'; allowed: every, cycle"),
        ("scoring.tasks=[rgb,normals]", "scoring.tasks: ['normals'] are not output tasks"),
        (
            "selection=infobatch selection.delta=0.005",
            "selection.delta: 0.005 x trainer.max_epochs=100 leaves no",
        ),
        ("selection=infobatch selection.prune_ratio=1.5", "selection.prune_ratio: 1.5 is outside (0, 1)"),
    ],
)
def test_invalid_combinations_fail_at_start_up_naming_the_key(printed_plan, override, message):
    with pytest.raises(ConfigError) as error:
        printed_plan(override.split())
    assert message in str(error.value)


@pytest.mark.slow
def test_a_start_up_error_on_the_command_line_is_one_message_without_a_traceback(tmp_path):
    proc = run_train(["print_plan=true", "ratio.final=0.1"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "ConfigError: ratio.final: 0.1 is below ratio.initial=0.2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_infobatch_plan_prunes_then_anneals_with_estimated_sizes(printed_plan):
    plan = printed_plan(["selection=infobatch"])
    assert len(plan) == 100 and plan[0]["kind"] == "full"
    pruned = [p for p in plan if p["kind"] == "subset"]
    assert [p["epoch"] for p in pruned] == list(range(1, 88))  # epochs e < 0.875 x 100, the first excepted
    assert all(p["estimated"] and p["reselect"] and p["cycle"] is None for p in pruned)
    assert all(p["kind"] == "full" and "estimated" not in p for p in plan[88:])  # the final 12 anneal
    assert pruned[0]["num_samples"] == 256 - 64  # estimate before any score: half of the set below the mean


@pytest.mark.slow
def test_unknown_strategy_lists_the_options(tmp_path):
    proc = run_train(["selection=greedy"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "Could not find 'selection/greedy'" in proc.stderr
    assert "soft" in proc.stderr and "hard" in proc.stderr


GRID_TINY = [
    "experiment=smoke",
    "trainer.enable_progress_bar=false",
    "trainer.max_epochs=5",
    "selection.total_cycles=2",
    "interval.initial=1",
    "interval.max=2",
    "validate_before_training=false",
]


@pytest.mark.slow
def test_ablation_grid_sweep_and_report(tmp_path):
    """The 12-cell grid plus the full-data baseline as one Hydra multirun, then the Table-3 report."""
    sweep = tmp_path / "sweep"
    run_train(
        [
            "-m",
            "selection=none,random,hard,soft",
            "ratio=cosine,incremental",
            "interval=fixed,incremental",
            *GRID_TINY,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        timeout=900,
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 16  # 4 selections x 2 ratios x 2 intervals (none repeats the baseline 4 times)
    for job in jobs:
        summary = read_summary(job)
        assert summary["status"] == "finished"
        assert summary["selection"]["strategy"] in job.name
    soft = read_summary(
        next(
            j
            for j in jobs
            if "selection=soft" in j.name
            and "ratio=incremental" in j.name
            and "interval=incremental" in j.name
        )
    )
    assert soft["reselections"] >= 2 and soft["scoring_time_s"] > 0
    assert (
        soft["samples_seen"]
        < read_summary(next(j for j in jobs if "selection=none" in j.name))["samples_seen"]
    )

    proc = subprocess.run(
        [sys.executable, "-m", "attent_vision.tools.report", str(sweep)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert "Ratio" in lines[0] and "Selection" in lines[0]
    assert "full data" in lines[2]
    assert len(lines) == 2 + 13  # header, separator, baseline + 12 cells
    assert (sweep / "report.md").is_file() and (sweep / "report.png").stat().st_size > 0


@pytest.mark.slow
def test_multimae_under_two_process_ddp_from_the_cli(tmp_path):
    """train.py trainer=ddp_cpu: 2 gloo processes, the subset split across them, one summary from rank 0."""
    run_train(
        [
            "experiment=smoke",
            "trainer=ddp_cpu",
            "data.batch_size=4",
            "trainer.enable_progress_bar=false",
            "hydra.run.dir=run",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    summary = read_summary(tmp_path / "run")
    # epoch 0: 48 samples / 2 ranks / batch 4 = 6 steps; epoch 1: k = floor(48 x 0.8) = 38 -> 19 per rank -> 4 steps
    assert summary["optimizer_steps"] == 10 and summary["planned_optimizer_steps"] == 10
    assert summary["samples_seen"] == 10 * 4 * 2
    assert summary["reselections"] == 1 and summary["initial_val_loss"] > summary["final_val_loss"]
    events = [json.loads(line) for line in (tmp_path / "run" / "selection.jsonl").read_text().splitlines()]
    assert [e["k"] for e in events] == [38]
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()
