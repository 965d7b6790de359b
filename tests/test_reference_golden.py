"""Numerical equivalence with the reference MultiMAE (EPFL-VILAB/MultiMAE), without a checkout of it.

``tests/assets/multimae_reference_golden.safetensors`` holds what the reference computed in one fp32 training step
of our micro model's initial weights on a fixed batch with fixed masks: encoder tokens, every decoder's
prediction, each task's loss, their sum and a few gradient norms. bench/reference_golden.py made it; the ``.json``
beside it records the reference commit, the command, the versions and the recipe of our model. Here our module is
rebuilt from that recipe (Hydra config and seed), checked to start from the same weights, and run through the same
step (``MultiMAEPretrainModule.sample_losses``, the batch reduction, task balancing, backward) on the stored inputs
and masks, with either attention kernel; everything must agree at atol = rtol = 1e-5.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "assets" / "multimae_reference_golden.safetensors"

SPEC = importlib.util.spec_from_file_location("reference_golden", ROOT / "bench" / "reference_golden.py")
reference_golden = importlib.util.module_from_spec(SPEC)
sys.modules["reference_golden"] = reference_golden
SPEC.loader.exec_module(reference_golden)


@pytest.fixture(scope="module")
def golden() -> tuple[dict, Any, dict, dict]:
    """(batch, masks, expected outputs, provenance) of the golden file."""
    return reference_golden.load_golden(GOLDEN)


@pytest.fixture(scope="module")
def our_module(golden):
    """Our micro pretraining module, built from conf/ with the golden file's seed."""
    GlobalHydra.instance().clear()  # build_ours initialises Hydra itself
    module, _ = reference_golden.build_our_module(golden[3]["recipe"]["seed"])
    return module


def assert_same_initial_weights(module, provenance: dict) -> None:
    fingerprint = reference_golden.weights_fingerprint(module.net.state_dict())
    changed = reference_golden.fingerprint_mismatches(
        fingerprint, provenance["initial_weights"]["fingerprint"]
    )
    assert not changed, (
        f"our initial weights are not those the golden file was made with ({len(changed)} tensors differ, e.g. "
        f"{changed[:5]}): the initialisation or the config changed. If that is intended, regenerate the golden "
        f"file: {provenance['command']}"
    )


def test_initial_weights_are_the_golden_files(our_module, golden):
    assert_same_initial_weights(our_module, golden[3])


@pytest.mark.parametrize("kernel", ["math", "fused"])
def test_training_step_matches_the_reference(our_module, golden, kernel):
    batch, masks, expected, provenance = golden
    assert_same_initial_weights(
        our_module, provenance
    )  # otherwise every output below differs for that reason
    actual = reference_golden.run_ours(our_module, batch, masks, fused=kernel == "fused")
    problems = reference_golden.mismatches(actual, expected)
    reference = provenance["reference"]
    assert not problems, (
        f"our model ({kernel} attention) no longer matches the reference MultiMAE "
        f"({reference['repository']} @ {reference['commit'][:12]}) at atol = rtol = {reference_golden.ATOL:g}:\n  "
        + "\n  ".join(problems)
    )
    assert set(actual) == set(expected)
