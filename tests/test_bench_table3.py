"""bench/table3.py's bookkeeping: the controls' overrides, subset epochs and the rule that picks the default."""

import importlib.util
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("table3", Path(__file__).parents[1] / "bench" / "table3.py")
table3 = importlib.util.module_from_spec(SPEC)
sys.modules["table3"] = table3  # dataclasses look their module up there
SPEC.loader.exec_module(table3)


def test_subset_epochs_count_the_epochs_below_a_full_one():
    cumulative = [{"samples_seen": n} for n in (256, 320, 384, 640, 768, 1024)]  # 256, 64, 64, 256, 128, 256
    assert table3.subset_epochs(cumulative) == 3


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


def _agg(row, time, top1, miou, delta1, std=1.0):
    return {
        "row": row,
        "seeds": 3,
        "pretrain_time_s": (time, 0.0),
        "top1": (top1, std),
        "mIoU": (miou, std),
        "delta1": (delta1, std),
    }


def test_the_rule_picks_the_fastest_setting_within_one_std_of_the_baseline():
    rows = [
        r for r in table3.ROWS if r.name in ("full", "soft", "soft_online", "random", "full_time_matched")
    ]
    aggregated = [
        _agg("full", 100, 50, 40, 60),
        _agg("soft", 85, 49.5, 40, 61),  # within one std everywhere
        _agg("soft_online", 70, 49.2, 39.5, 59.1),  # within one std, faster
        _agg("random", 60, 45, 40, 60),  # top-1 five std below
        _agg("full_time_matched", 50, 50, 40, 60),  # a control: never the default
    ]
    text = table3.verdict(rows, aggregated)
    assert "fastest teacher setting meeting the rule: soft_online (0.700×)" in text
    assert "- random: 0.600× the baseline's time; top1 -5.00 std" in text and "misses" in text
