"""The AtteNT teacher: schedules, epoch plan, selection strategies, score bank, sampler and Lightning callback.

Model-agnostic: it knows sample indices and per-sample scores only.
"""

from attent_vision.selection.plan import EpochPlan, build_plan, plan_totals, subset_size
from attent_vision.selection.sampler import SubsetSampler
from attent_vision.selection.schedules import IntervalSchedule, RatioSchedule
from attent_vision.selection.score_bank import ScoreBank
from attent_vision.selection.strategies import select, select_hard, select_random, select_soft
from attent_vision.selection.teacher import AtteNTTeacher, TeacherSetupError

__all__ = [
    "AtteNTTeacher",
    "EpochPlan",
    "IntervalSchedule",
    "RatioSchedule",
    "ScoreBank",
    "SubsetSampler",
    "TeacherSetupError",
    "build_plan",
    "plan_totals",
    "select",
    "select_hard",
    "select_random",
    "select_soft",
    "subset_size",
]
