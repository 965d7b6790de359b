"""The AtteNT teacher: selectors, scorers, schedules, epoch plan, score bank, sampler and the Lightning callback.

Model-agnostic: it knows sample indices and per-sample scores only (the contract is in ``contracts.py``).
"""

from attent_vision.data.sampler import SubsetSampler
from attent_vision.selection.contracts import (
    LabelledDataModule,
    PlannedSchedule,
    ResizableSchedule,
    ScorableModule,
    ScoringDataModule,
    SelectableDataModule,
    SelectableModule,
    TeacherSetupError,
    WeightedLossModule,
)
from attent_vision.selection.infobatch import InfoBatchPruner
from attent_vision.selection.plan import (
    EpochPlan,
    PlanRequest,
    build_plan,
    cycle_plan,
    full_data_plan,
    plan_totals,
    subset_size,
)
from attent_vision.selection.sampling import WholeStepSampler
from attent_vision.selection.schedules import IntervalSchedule, RatioSchedule
from attent_vision.selection.score_bank import ScoreBank
from attent_vision.selection.scoring import FullPassScorer, OnlineScorer, Scorer
from attent_vision.selection.selectors import (
    CycleSelector,
    FullData,
    HardSelector,
    RandomSelector,
    Selection,
    Selector,
    SoftSelector,
    select,
)
from attent_vision.selection.strategies import select_hard, select_random, select_soft
from attent_vision.selection.teacher import AtteNTTeacher

__all__ = [
    "AtteNTTeacher",
    "CycleSelector",
    "EpochPlan",
    "FullData",
    "FullPassScorer",
    "HardSelector",
    "InfoBatchPruner",
    "IntervalSchedule",
    "LabelledDataModule",
    "OnlineScorer",
    "PlanRequest",
    "PlannedSchedule",
    "RandomSelector",
    "RatioSchedule",
    "ResizableSchedule",
    "ScorableModule",
    "ScoreBank",
    "Scorer",
    "ScoringDataModule",
    "SelectableDataModule",
    "SelectableModule",
    "Selection",
    "Selector",
    "SoftSelector",
    "SubsetSampler",
    "TeacherSetupError",
    "WeightedLossModule",
    "WholeStepSampler",
    "build_plan",
    "cycle_plan",
    "full_data_plan",
    "plan_totals",
    "select",
    "select_hard",
    "select_random",
    "select_soft",
    "subset_size",
]
