"""The test suite's own machinery works as pyproject.toml and tests/conftest.py say: tests that share fixed ports or
system packages (``xdist_group("system")``) really share one pytest-xdist worker, and test processes compute with
one thread."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.mark.xdist_group("system")
def test_xdist_groups_are_honoured(request: pytest.FixtureRequest) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("not under pytest-xdist (-n 0): there is nothing to group")
    # --dist loadgroup keys a grouped test's scheduling on this suffix; without it (pytest 9.2 with xdist 3.8) the
    # group's tests are dealt to both workers and two local SLURM clusters would fight over the same ports.
    assert request.node.nodeid.endswith("@system"), request.node.nodeid


def test_test_processes_compute_with_one_thread() -> None:
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "1"
