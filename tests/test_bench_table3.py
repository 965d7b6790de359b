"""bench/table3.py: the pairing by seed, the paired statistics, the margins, the costs, and the table's rows."""

import importlib.util
import json
import math
import sys
import threading
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("table3", Path(__file__).parents[1] / "bench" / "table3.py")
table3 = importlib.util.module_from_spec(SPEC)
sys.modules["table3"] = table3  # dataclasses look their module up there
SPEC.loader.exec_module(table3)

T_975_DF2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (tables)
T_975_DF4 = 2.7764451051977987  # ... 4 degrees of freedom


# ------------------------------------------------------------------------------------------------ helpers


def _results(values_by_row: dict[str, list[float]], key: str = "knn_cls.top1", times=None) -> dict:
    """results[(row, seed)] with one downstream number (and pretraining times) per seed."""
    out = {}
    for row, values in values_by_row.items():
        for seed, value in enumerate(values):
            if value is None:
                continue
            run = {"row": row, "seed": seed, "downstream": {key: value}, "chance": {}}
            if times is not None:
                run["pretrain_time_s"] = times[row][seed]
            out[(row, seed)] = run
    return out


def _eval_summary(final: dict, chance: dict, status="finished") -> dict:
    """What finetune.py (fine-tuning or a probe) writes to summary.json."""
    return {"status": status, "wall_time_s": 3.5, "metrics": {"main": next(iter(final)), "final": final},
            "chance": chance}  # fmt: skip


def _pretrain_summary(passes: int, samples: int, steps: int, wall: float) -> dict:
    per_epoch = samples // 4
    history = [{"samples_seen": per_epoch * (e + 1)} for e in range(4)]
    return {"status": "finished", "wall_time_s": wall, "samples_seen": samples, "optimizer_steps": steps,
            "scoring_passes": passes, "scoring_time_s": 1.0, "final_val_loss": 2.5, "history": history}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the pairing by seed


def test_every_row_passes_the_full_data_rows_seed_and_only_pretrained_differs_downstream(tmp_path):
    sizes = table3.sizes_for("mini", tmp_path)
    full_eval = {
        s: table3.eval_args(table3.EVALS[s], tmp_path / "full", 3, sizes, tmp_path / s) for s in table3.EVALS
    }
    for row in table3.ALL_ROWS.values():
        if row.pretrains and row.control is None:
            args = table3.pretrain_args(row.overrides, 3, sizes, tmp_path / row.name)
            assert args[-1] == "seed=3" and [a for a in args if "seed" in a.split("=")[0]] == ["seed=3"], (
                row.name
            )
        pretrained = tmp_path / row.name if row.pretrains else None
        for name, stage in table3.EVALS.items():
            args = table3.eval_args(stage, pretrained, 3, sizes, tmp_path / name)
            assert args[-1] == "seed=3"
            differ = sorted(set(args) ^ set(full_eval[name]))
            expected = [] if row.name == "full" else sorted([f"pretrained={pretrained or 'null'}",
                                                              f"pretrained={tmp_path / 'full'}"])  # fmt: skip
            assert differ == expected, (row.name, name)


def test_the_composed_configs_of_every_row_share_the_full_rows_seeds_data_and_network(tmp_path):
    sizes = table3.sizes_for("mini", tmp_path)
    full = table3.seed_fingerprint(table3.FULL.overrides, 3, sizes)
    # The seed reaches the model init (train.py seeds with cfg.seed), the sampler (teacher.seed) and the
    # augmentation/mask streams (data.seed).
    assert full["seed"] == full["data.seed"] == full["teacher.seed"] == 3
    results = {
        ("full", 3): {"pretrain_time_s": 200.0, "samples_seen": 5120},
        ("soft", 3): {"pretrain_time_s": 150.0, "samples_seen": 3904, "subset_epochs": 9},
    }
    overrides = {r.name: r.overrides for r in table3.ALL_ROWS.values() if r.pretrains and r.control is None}
    for row in table3.ROWS:
        if row.control:
            overrides[row.name] = table3.control_overrides(row, 3, results, sizes)
    table3.check_same_seed(overrides, 3, sizes)  # raises on a difference

    with pytest.raises(table3.RunFailed, match=r"row wider, seed 3: \['model.net'\] differ"):
        table3.check_same_seed({"wider": ("selection=soft", "model.net.decoder_dim=64")}, 3, sizes)
    with pytest.raises(table3.RunFailed, match="a row may not set a seed"):
        table3.check_same_seed({"reseeded": ("selection=soft", "data.seed=7")}, 3, sizes)


@pytest.mark.parametrize("schedule", ["shipped", "mini", "quick"])
def test_every_row_of_every_schedule_plans(schedule, tmp_path):
    from hydra.utils import instantiate

    sizes = table3.sizes_for(schedule, tmp_path)
    if schedule == "shipped":  # train.py's own length: no epoch or cycle override
        assert sizes.pretrain == [] and (sizes.epochs, sizes.warmup_epochs) == (100, 5.0)
        assert table3.SCHEDULE_ROWS["shipped"] == ["full", "soft", "soft_online", "soft_cycle", "random",
                                                   "infobatch", "scratch"]  # fmt: skip
    for name in table3.SCHEDULE_ROWS[schedule]:
        row = table3.ALL_ROWS[name]
        if not row.pretrains or row.control:
            continue
        cfg = table3.compose("train", [*sizes.pretrain, *row.overrides, f"paths.output_dir={tmp_path}"])
        teacher = instantiate(cfg.teacher)
        plan = teacher.make_plan(max_epochs=int(cfg.trainer.max_epochs), batch_size=int(cfg.data.batch_size),
                                 dataset_size=int(cfg.data.synthetic.num_train), world_size=1)  # fmt: skip
        assert len(plan) == sizes.epochs


def test_controls_match_the_default_rows_time_and_samples():
    sizes = table3.Sizes(epochs=20, warmup_epochs=2.0)
    results = {
        ("full", 0): {"pretrain_time_s": 200.0, "samples_seen": 5120},
        ("soft", 0): {"pretrain_time_s": 150.0, "samples_seen": 3904, "subset_epochs": 9},
    }
    rows = {row.name: row for row in table3.ROWS}
    matched = table3.control_overrides(rows["full_time_matched"], 0, results, sizes)
    assert matched == ["selection=none", "trainer.max_epochs=15", "model.warmup_epochs=1.500"]
    same = table3.control_overrides(rows["random_same_samples"], 0, results, sizes)
    # 11 full epochs of 256 + 9 subset epochs at ratio r: 2816 + 9 * 256 * r = 3904
    assert same[-1] == f"ratio.initial={(3904 - 2816) / (9 * 256):.4f}"
    assert "selection=random" in same and "ratio=constant" in same
    with pytest.raises(table3.RunFailed, match="needs the rows 'full' and 'soft' for seed 1"):
        table3.control_overrides(rows["full_time_matched"], 1, results, sizes)


def test_subset_epochs_count_the_epochs_below_a_full_one():
    cumulative = [{"samples_seen": n} for n in (256, 320, 384, 640, 768, 1024)]  # 256, 64, 64, 256, 128, 256
    assert table3.subset_epochs(cumulative) == 3


# ------------------------------------------------------------------------------------------------ statistics


def test_the_paired_difference_and_its_t_interval_match_a_hand_computation():
    # Seed 3 has no full-data run: it cannot be paired and is left out.
    results = _results({"full": [50.0, 52.0, 50.0], "soft": [52.0, 55.0, 51.0, 99.0]})
    pairs = table3.paired(results, "soft", [0, 1, 2, 3], lambda r: r["downstream"]["knn_cls.top1"])
    assert pairs == [(52.0, 50.0), (55.0, 52.0), (51.0, 50.0)]
    interval = table3.paired_difference(pairs)
    # d = 2, 3, 1: mean 2, sd 1, half-width t(0.975, 2) * 1 / sqrt(3)
    half = T_975_DF2 / math.sqrt(3)
    assert interval.n == 3 and interval.mean == pytest.approx(2.0) and interval.std == pytest.approx(1.0)
    assert (interval.low, interval.high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert table3.paired_difference(pairs[:1]).low is None  # one pair: a difference, no interval


def test_time_is_the_geometric_mean_of_the_paired_ratios_with_an_interval_on_their_logs():
    pairs = [(80.0, 100.0), (150.0, 200.0), (90.0, 100.0)]
    logs = [math.log(0.8), math.log(0.75), math.log(0.9)]
    mean = sum(logs) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / 2)
    half = T_975_DF2 * sd / math.sqrt(3)
    ratio = table3.as_ratio(table3.paired_log_ratio(pairs))
    assert ratio["ratio"] == pytest.approx((0.8 * 0.75 * 0.9) ** (1 / 3))
    assert (ratio["low"], ratio["high"]) == (
        pytest.approx(math.exp(mean - half)),
        pytest.approx(math.exp(mean + half)),
    )
    # 0.8x on average, but the interval reaches past 1 with three noisy seeds: not shown faster ...
    assert ratio["high"] > 1 and table3.is_faster(table3.paired_log_ratio(pairs)) is False
    # ... while the same 0.8x on every seed is.
    assert table3.is_faster(table3.paired_log_ratio([(80.0, 100.0), (160.0, 200.0), (84.0, 105.0)])) is True


def test_meets_compares_the_worse_end_of_the_interval_with_the_margin_in_both_directions():
    def interval(low, high):
        return table3.Interval((low + high) / 2, low, high, 5, 1.0)

    # Higher is better (top-1): the low end must lie above -margin.
    assert table3.meets(interval(-0.9, 2.0), 1.0, higher_better=True) is True
    assert table3.meets(interval(-1.1, 2.0), 1.0, higher_better=True) is False
    assert table3.meets(interval(-1.0, 2.0), 1.0, higher_better=True) is False  # on the margin: not cleared
    # Lower is better (abs_rel): the high end must lie below +margin; a large gain does not rescue a wide interval.
    assert table3.meets(interval(-0.05, 0.009), 0.01, higher_better=False) is True
    assert table3.meets(interval(-0.05, 0.011), 0.01, higher_better=False) is False
    # Undecided without a margin or an interval.
    assert table3.meets(interval(-0.9, 2.0), None, higher_better=True) is None
    assert table3.meets(table3.Interval(0.5, None, None, 1, None), 1.0, higher_better=True) is None
    assert table3.higher_is_better("linear_cls.top1") and table3.higher_is_better("linear_semseg.mIoU")
    assert not table3.higher_is_better("linear_depth.abs_rel") and not table3.higher_is_better(
        "ft_depth.rmse"
    )


def test_a_row_whose_depth_error_grows_misses_even_though_its_difference_is_positive():
    seeds = [0, 1, 2, 3, 4]
    full = [0.200, 0.210, 0.190, 0.205, 0.195]
    worse = [v + 0.05 + j for v, j in zip(full, [0.001, -0.001, 0.002, -0.002, 0.0], strict=True)]
    better = [v - 0.05 + j for v, j in zip(full, [0.001, -0.001, 0.002, -0.002, 0.0], strict=True)]
    results = {**_results({"full": full, "soft": worse}, "linear_depth.abs_rel"),
               **_results({"soft_online": better}, "linear_depth.abs_rel")}  # fmt: skip
    margins = {"linear_depth.abs_rel": 0.02}
    soft = table3.row_statistics(table3.ALL_ROWS["soft"], results, seeds, margins)["downstream"]
    online = table3.row_statistics(table3.ALL_ROWS["soft_online"], results, seeds, margins)["downstream"]
    assert soft["linear_depth.abs_rel"]["difference"]["mean"] == pytest.approx(0.05)
    assert soft["linear_depth.abs_rel"]["meets"] is False
    assert online["linear_depth.abs_rel"]["meets"] is True


# ------------------------------------------------------------------------------------------------ margins


def test_margins_are_k_times_the_full_rows_seed_std_from_a_pilot():
    full = [50.0, 52.0, 49.0, 51.0, 53.0]
    runs = [{"row": "full", "seed": s, "downstream": {"knn_cls.top1": v, "linear_depth.abs_rel": 0.2}}
            for s, v in enumerate(full)]  # fmt: skip
    runs.append({"row": "full", "seed": 9, "downstream": {"linear_cls.top1": 40.0}})  # one seed: no spread
    soft = [51.0, 51.0, 50.0, 52.0, 52.0]  # paired differences 1, -1, 1, 1, -1
    runs += [{"row": "soft", "seed": s, "downstream": {"knn_cls.top1": v}} for s, v in enumerate(soft)]
    derived = table3.derive_margins(runs, k=2.0)
    std = math.sqrt(sum((v - 51.0) ** 2 for v in full) / 4)  # sqrt(10 / 4)
    assert derived["knn_cls.top1"]["margin"] == pytest.approx(2.0 * std)
    assert derived["knn_cls.top1"]["n"] == 5
    assert derived["linear_depth.abs_rel"]["margin"] == 0.0  # no spread, no margin to give away
    assert "linear_cls.top1" not in derived
    diffs_sd = math.sqrt(sum((d - 0.2) ** 2 for d in [1, -1, 1, 1, -1]) / 4)
    assert derived["knn_cls.top1"]["half_width_at_5"] == pytest.approx(T_975_DF4 * diffs_sd / math.sqrt(5))
    # Older table3.json files name fine-tuning's numbers top1 / mIoU / delta1.
    legacy = [{"row": "full", "seed": s, "top1": v, "mIoU": 25.0 + s} for s, v in enumerate(full)]
    assert table3.derive_margins(legacy, k=1.0)["ft_cls.top1"]["margin"] == pytest.approx(std)
    assert table3.derive_margins(legacy, k=1.0)["ft_semseg.mIoU"]["margin"] == pytest.approx(math.sqrt(2.5))


def test_margins_from_prints_a_dict_to_paste_into_margins(tmp_path, capsys):
    runs = [
        {"row": "full", "seed": s, "downstream": {"knn_cls.top1": v}}
        for s, v in enumerate([50.0, 52.0, 49.0])
    ]
    pilot = tmp_path / "table3.json"
    pilot.write_text(json.dumps({"settings": {"schedule": "shipped"}, "runs": runs}))
    table3.main(["--margins-from", str(pilot), "--margin-k", "3"])
    printed = capsys.readouterr().out
    assert "3.0 x the full-data row's seed std" in printed
    body = printed[printed.index("'shipped': {") + len("'shipped': ") :].rstrip().rstrip(",")
    pasted = eval(body)  # the printed text is a Python dict literal
    assert pasted == {"knn_cls.top1": pytest.approx(3 * math.sqrt(7 / 3), rel=1e-3)}


def test_the_fixed_margins_name_real_numbers_and_the_mini_ones_follow_from_their_pilot():
    for schedule, margins in table3.MARGINS.items():
        for key in margins:
            stage, metric = key.split(".")
            assert stage in table3.EVALS and metric, (schedule, key)
    pilot = json.loads((table3.ROOT / "docs" / "benchmarks" / "table3_mini_pilot.json").read_text())
    derived = table3.derive_margins(pilot["runs"], table3.MARGIN_K)
    for key, margin in table3.MARGINS["mini"].items():
        assert margin == pytest.approx(derived[key]["margin"], rel=0.01), key


# ------------------------------------------------------------------------------------------------ runs and costs


def _burner(seconds: float) -> list[str]:
    code = f"import time\nt = time.process_time()\nwhile time.process_time() - t < {seconds}:\n    pass\n"
    return [sys.executable, "-c", code]


def test_cpu_seconds_are_the_childs_own_beside_a_parallel_run_and_include_what_it_waited_for(tmp_path):
    costs = {}

    def run(name, command):
        costs[name] = table3.run_child(command, tmp_path / f"{name}.log")

    threads = [threading.Thread(target=run, args=("short", _burner(0.8))),
               threading.Thread(target=run, args=("long", _burner(1.6)))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # RUSAGE_CHILDREN deltas around the long one would also count the short one, which ends while it runs
    # (1.6 + 0.8 s); each child's own rusage holds its burn and its interpreter's start-up only.
    assert 0.78 <= costs["short"].cpu_s < 1.2, costs
    assert 1.58 <= costs["long"].cpu_s < 2.0, costs
    assert costs["short"].returncode == costs["long"].returncode == 0
    # A grandchild it waits for (as DataLoader workers are) counts for the child.
    spawner = [sys.executable, "-c", f"import subprocess; subprocess.run({_burner(0.5)!r}, check=True)"]
    assert table3.run_child(spawner, tmp_path / "spawner.log").cpu_s >= 0.48
    assert (
        table3.run_child([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "fail.log").returncode == 3
    )


def test_a_stage_reads_every_number_and_the_chance_level_of_its_summary():
    stage = table3.EVALS["linear_depth"]
    summary = _eval_summary({"delta1": 61.5, "abs_rel": 0.21, "rmse": 0.73, "nan_metric": float("nan")},
                            {"delta1": 38.2, "rmse": 1.12, "how": "the median depth"})  # fmt: skip
    numbers = table3.eval_numbers(stage, summary, {"wall_s": 9.0, "cpu_s": 12.5})
    assert numbers["downstream"] == {"linear_depth.delta1": 61.5, "linear_depth.abs_rel": 0.21,
                                     "linear_depth.rmse": 0.73}  # fmt: skip
    assert numbers["chance"] == {"linear_depth.delta1": 38.2, "linear_depth.rmse": 1.12}
    assert numbers["cost"] == {"wall_time_s": 3.5, "process_wall_s": 9.0, "cpu_s": 12.5}


def test_scoring_forward_samples_are_passes_times_the_training_set(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\ndata:\n  synthetic:\n    num_train: 256\n")
    numbers = table3.pretrain_numbers(_pretrain_summary(9, 3904, 122, 161.5), tmp_path, {"cpu_s": 300.0})
    assert (numbers["scoring_passes"], numbers["scoring_forward_samples"]) == (9, 9 * 256)
    assert (numbers["samples_seen"], numbers["optimizer_steps"], numbers["cpu_s"]) == (3904, 122, 300.0)
    assert (
        table3.pretrain_numbers(_pretrain_summary(0, 5120, 160, 170.0), tmp_path, {})[
            "scoring_forward_samples"
        ]
        == 0
    )


@pytest.fixture
def fake_scripts(monkeypatch):
    """Replaces train.py / finetune.py by writers of their summary.json; records every call."""
    calls = []

    def run_script(script, args, log, threads):
        calls.append((script, args))
        run_dir = Path(next(a for a in args if a.startswith("hydra.run.dir=")).split("=", 1)[1])
        run_dir.mkdir(parents=True, exist_ok=True)
        seed = int(args[-1].split("=")[1])
        if script == "train.py":
            (run_dir / ".hydra").mkdir(exist_ok=True)
            (run_dir / ".hydra" / "config.yaml").write_text("data:\n  synthetic:\n    num_train: 256\n")
            summary = _pretrain_summary(9, 3904, 122, 150.0 + seed)
        else:
            task = next(a for a in args if a.startswith("task=")).split("=")[1]
            final = {"cls": {"top1": 40.0 + seed, "top5": 90.0}, "depth": {"delta1": 50.0, "abs_rel": 0.2},
                     "semseg": {"mIoU": 20.0}}[task]  # fmt: skip
            summary = _eval_summary(final, {next(iter(final)): 16.7, "how": "trivial"})
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return table3.ChildCost(0, 5.0, 4.0, 3.5, 0.5)

    monkeypatch.setattr(table3, "run_script", run_script)
    return calls


def test_scratch_evaluates_a_random_encoder_and_every_stage_resumes(tmp_path, fake_scripts):
    sizes = table3.sizes_for("mini", tmp_path)
    stages = [table3.EVALS[n] for n in table3.EVAL_GROUPS["probe"]]
    scratch = table3.run_row(table3.SCRATCH, 2, tmp_path, sizes, stages, {}, threads=1)
    assert [script for script, _ in fake_scripts] == ["finetune.py"] * 4
    assert all("pretrained=null" in args and args[-1] == "seed=2" for _, args in fake_scripts)
    assert {a for _, args in fake_scripts for a in args if a.startswith("probe=")} == {
        "probe=knn",
        "probe=linear",
    }
    assert scratch["downstream"]["knn_cls.top1"] == 42.0 and scratch["chance"]["knn_cls.top1"] == 16.7
    assert scratch["evals"]["knn_cls"]["cpu_s"] == 4.0 and "pretrain_time_s" not in scratch

    fake_scripts.clear()
    assert table3.run_row(table3.SCRATCH, 2, tmp_path, sizes, stages, {}, threads=1) == scratch
    assert fake_scripts == []  # every probe stage resumed from its summary and cost files

    soft = table3.run_row(table3.ALL_ROWS["soft"], 2, tmp_path, sizes, stages, {}, threads=1)
    assert soft["scoring_forward_samples"] == 9 * 256 and soft["cpu_s"] == 4.0
    assert f"pretrained={tmp_path / 'soft' / 'seed2' / 'pretrain'}" in fake_scripts[1][1]
    # A pretraining that runs again makes its finished evaluations stale.
    (tmp_path / "soft" / "seed2" / "pretrain" / "summary.json").unlink()
    fake_scripts.clear()
    table3.run_row(table3.ALL_ROWS["soft"], 2, tmp_path, sizes, stages, {}, threads=1)
    assert [script for script, _ in fake_scripts] == ["train.py"] + ["finetune.py"] * 4


# ------------------------------------------------------------------------------------------------ the table and the rule


SEEDS = [0, 1, 2, 3, 4]
JITTER = [0.3, -0.3, 0.2, -0.2, 0.0]


def _full_results(rows: dict[str, tuple[float, float, float]]) -> dict:
    """Five seeds per row: (time ratio, top-1 offset, abs_rel offset) against full data, with a little noise."""
    full_top1, full_absrel, full_time = (
        [50, 52, 49, 51, 53],
        [0.20, 0.21, 0.19, 0.205, 0.195],
        [100, 110, 95, 105, 100],
    )
    results = {}
    for name, (ratio, top1, absrel) in {"full": (1.0, 0.0, 0.0), **rows}.items():
        for s in SEEDS:
            j = JITTER[s] if name != "full" else 0.0
            run = {"row": name, "seed": s, "chance": {"knn_cls.top1": 16.67, "linear_depth.abs_rel": 0.45},
                   "downstream": {"knn_cls.top1": full_top1[s] + top1 + j, "linear_depth.delta1": 60.0 + j,
                                  "linear_depth.abs_rel": full_absrel[s] + absrel + j / 100}}  # fmt: skip
            if table3.ALL_ROWS[name].pretrains:
                run.update(pretrain_time_s=full_time[s] * ratio * (1 + j / 100), cpu_s=2 * full_time[s] * ratio,
                           samples_seen=5120 * ratio, optimizer_steps=160 * ratio, scoring_passes=0,
                           scoring_forward_samples=0, scoring_time_s=0.0, final_val_loss=2.5)  # fmt: skip
            results[(name, s)] = run
    return results


def test_the_table_shows_paired_differences_and_the_scratch_and_chance_rows():
    rows = [table3.ALL_ROWS[n] for n in ("full", "soft", "scratch")]
    results = _full_results({"soft": (0.8, -0.5, 0.0), "scratch": (1.0, -20.0, 0.1)})
    stages = [table3.EVALS["knn_cls"], table3.EVALS["linear_depth"]]
    text, summary = table3.summarise(
        rows, SEEDS, results, stages, {"knn_cls.top1": 2.0, "linear_depth.abs_rel": 0.02}
    )
    lines = text.splitlines()
    scratch = next(
        line for line in lines if line.startswith("| from scratch (no pretraining) (`scratch`) | 31.00")
    )
    assert "Δ -20.00 [" in scratch and "misses" in scratch  # pretraining is worth 20 points here
    assert "| chance | 16.67 | – | 0.4500 |" in lines  # delta1 has no chance level here
    assert (
        "| from scratch (no pretraining) (`scratch`) | – | – | – | 5 | none |" in text
    )  # no pretraining cost
    assert "| knn_cls.top1 | higher | | chance | | 16.67 | | |" in lines
    soft = summary["rows"]["soft"]
    assert soft["time_ratio"]["ratio"] == pytest.approx(0.8, rel=1e-3) and soft["faster"] is True
    assert soft["downstream"]["knn_cls.top1"]["difference"]["mean"] == pytest.approx(-0.5)
    assert soft["downstream"]["knn_cls.top1"]["meets"] is True
    assert summary["rows"]["scratch"]["downstream"]["knn_cls.top1"]["meets"] is False
    assert summary["chance"] == {"knn_cls.top1": 16.67, "linear_depth.abs_rel": 0.45}
    assert "ft_cls" not in text  # only the stages that ran


def test_the_rule_picks_the_fastest_candidate_that_is_faster_and_meets_every_margin():
    names = ("full", "soft", "soft_online", "soft_cycle", "random", "full_time_matched", "scratch")
    rows = [table3.ALL_ROWS[n] for n in names]
    results = _full_results({
        "soft": (0.9, -0.5, 0.0),  # meets, faster
        "soft_online": (0.7, -0.8, 0.005),  # meets, fastest candidate
        "soft_cycle": (0.6, 0.0, 0.05),  # faster still, but its depth error grows past the margin
        "random": (0.5, 0.0, 0.0),  # a yardstick: never the default
        "full_time_matched": (0.55, 0.0, 0.0),
        "scratch": (1.0, -20.0, 0.1),
    })  # fmt: skip
    stages = [table3.EVALS["knn_cls"], table3.EVALS["linear_depth"], table3.EVALS["ft_cls"]]
    margins = {"knn_cls.top1": 2.0, "linear_depth.delta1": 2.0, "linear_depth.abs_rel": 0.02}
    text, summary = table3.summarise(rows, SEEDS, results, stages, margins)
    # The probes decide, fine-tuning is only reported.
    assert summary["verdict_keys"] == ["knn_cls.top1", "linear_depth.delta1", "linear_depth.abs_rel"]
    assert summary["verdict"]["default"] == "soft_online"
    assert "fastest teacher setting meeting the rule: soft_online (0.700×" in text
    assert "- soft_cycle: time 0.600×" in text and "linear_depth.abs_rel misses" in text
    assert "- random (yardstick, never the default):" in text

    # Margins not fixed yet: nothing is decided.
    text, summary = table3.summarise(rows, SEEDS, results, stages, {"knn_cls.top1": 2.0})
    assert summary["verdict"]["default"] is None
    assert "undecided: soft, soft_online" in text and "no margin" in text
    # Without probes, fine-tuning's numbers decide.
    assert table3.verdict_keys([table3.EVALS["ft_cls"], table3.EVALS["ft_depth"]]) == [
        "ft_cls.top1", "ft_depth.delta1", "ft_depth.abs_rel"]  # fmt: skip


def test_difficulty_aware_rows_are_compared_with_random_selection_paired_by_seed():
    rows = [table3.ALL_ROWS[n] for n in ("full", "soft", "soft_online", "soft_cycle", "random", "infobatch")]
    results = _full_results({
        "soft": (0.9, 3.0, 0.0),  # 3 points above random on every seed
        "soft_online": (0.6, -0.8, 0.0),  # below it
        "soft_cycle": (0.75, 0.0, 0.0),  # the same as random
        "random": (0.6, 0.0, 0.0),
        "infobatch": (0.5, 9.0, 0.0),  # a yardstick: not compared
    })  # fmt: skip
    text, summary = table3.summarise(rows, SEEDS, results, [table3.EVALS["knn_cls"]], {"knn_cls.top1": 2.0})
    versus = summary["against_random"]
    assert set(versus) == {"soft", "soft_online", "soft_cycle"}
    assert versus["soft"]["knn_cls.top1"]["mean"] == pytest.approx(3.0)
    assert versus["soft"]["time_ratio"]["ratio"] == pytest.approx(1.5, rel=1e-3)
    lines = text.splitlines()
    assert any(line.startswith("| AtteNT soft (`soft`) | 1.500×") and "+3.00 [+3.00, +3.00] better" in line
               for line in lines)  # fmt: skip
    assert any("(`soft_online`)" in line and "-0.80 [-0.80, -0.80] worse" in line for line in lines)
    assert any("(`soft_cycle`)" in line and "(not resolved)" in line for line in lines)
    # Without a random row there is nothing to compare with.
    _, summary = table3.summarise(rows[:2], SEEDS, results, [table3.EVALS["knn_cls"]], {"knn_cls.top1": 2.0})
    assert summary["against_random"] == {}


def test_jobs_one_runs_seed_by_seed_full_data_first_and_controls_after_their_inputs(tmp_path, monkeypatch):
    order = []

    def run_row(row, seed, out, sizes, stages, results, threads):
        order.append((row.name, seed))
        return {"row": row.name, "seed": seed}

    monkeypatch.setattr(table3, "run_row", run_row)
    rows = [table3.ALL_ROWS[n] for n in ("full_time_matched", "scratch", "random", "soft", "full")]
    results = table3.run_all(rows, [0, 1], tmp_path, table3.Sizes(), [], jobs=1, threads=2)
    assert len(results) == 10
    assert order[:5] == [("full", 0), ("soft", 0), ("scratch", 0), ("random", 0), ("full_time_matched", 0)]
