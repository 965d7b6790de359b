"""The plain-``sbatch`` requeue path (no submitit): SIGUSR1 saves the state, the first rank calls ``scontrol requeue``
on its job, and every rank exits 0.

The README's recipe is ``sbatch --requeue --signal=USR1@120`` with ``srun python train.py ...``. Without a SLURM
here, ``srun`` is played by starting one ``train.py`` per rank with the variables srun sets for a task, and
``scontrol`` by a stand-in first on ``PATH`` that records who called it with which arguments. The code that decides
(``attent_vision/runs/stops.py``) reads ``SLURM_JOB_ID`` (plain SLURM, so SIGUSR1 means requeue),
``SLURM_ARRAY_JOB_ID``/``SLURM_ARRAY_TASK_ID`` (the id to requeue) and ``SLURM_PROCID`` (only rank 0 requeues);
Lightning's SLURM environment reads the task layout (``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``, ...).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from attent_vision.runs.cli import run_entry_point
from attent_vision.runs.endings import RunEnded, ending_of
from attent_vision.runs.stops import RunStopped, request_requeue

from .conftest import TINY_OVERRIDES, read_summary, run_train

# SLURM's own answer when it cannot requeue (e.g. a job submitted without --requeue on a cluster that defaults to
# JobRequeue=0).
SCONTROL_REFUSAL = "scontrol: error: Requeue of JobId=4243 failed: Requested operation is presently disabled"


def _fake_scontrol(folder: Path, *, exit_code: int = 0) -> tuple[Path, Path]:
    """An ``scontrol`` that appends ``procid=<SLURM_PROCID> <argv>`` to a log and exits with ``exit_code``.

    Returns the folder to put first on ``PATH`` and the log it writes.
    """
    bin_dir, log = folder / "bin", folder / "scontrol.log"
    bin_dir.mkdir(parents=True)
    refusal = f"echo '{SCONTROL_REFUSAL}' >&2\n" if exit_code else ""
    script = bin_dir / "scontrol"
    script.write_text(
        "#!/bin/sh\n"
        f"printf 'procid=%s %s\\n' \"${{SLURM_PROCID-unset}}\" \"$*\" >> '{log}'\n"
        f"{refusal}exit {exit_code}\n"
    )
    script.chmod(0o755)
    return bin_dir, log


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _without_outer_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    # A CI runner inside a SLURM job must not leak its own job into these.
    for key in list(os.environ):
        if key.startswith(("SLURM_", "SUBMITIT_")):
            monkeypatch.delenv(key)


@pytest.mark.parametrize(
    ("slurm_env", "expected_id"),
    [
        ({"SLURM_JOB_ID": "4243"}, "4243"),
        # A task of a job array has its own SLURM_JOB_ID; SLURM names it <array job id>_<task id>.
        ({"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2"}, "4240_2"),
    ],
    ids=["plain-job", "array-task"],
)
def test_scontrol_requeues_the_job_or_the_array_task_by_its_slurm_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slurm_env: dict[str, str], expected_id: str
) -> None:
    bin_dir, log = _fake_scontrol(tmp_path)
    _without_outer_slurm(monkeypatch)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in slurm_env.items():
        monkeypatch.setenv(key, value)
    assert request_requeue() is True
    assert _calls(log) == [f"procid=unset requeue {expected_id}"]


def test_a_refused_requeue_exits_1_and_says_to_resume_by_hand(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bin_dir, log = _fake_scontrol(tmp_path, exit_code=1)
    _without_outer_slurm(monkeypatch)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    monkeypatch.setenv("SLURM_PROCID", "0")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"status": "requeued"}))  # as the stopped run left it
    stopped = "Stopped by SIGUSR1 for a requeue at epoch 1, step 4: the state is saved in stopped.ckpt."

    def stopped_run(cfg: object) -> None:
        raise RunEnded(stopped, 0, requeue=True)  # what ending_of makes of a requeue stop

    cfg = OmegaConf.create({"paths": {"output_dir": str(run_dir)}})
    with (
        caplog.at_level(logging.WARNING, logger="attent_vision.runs.stops"),
        pytest.raises(SystemExit) as exited,
    ):
        run_entry_point(stopped_run, cfg)
    assert exited.value.code == 1
    assert _calls(log) == ["procid=0 requeue 4243"]
    assert f"scontrol requeue 4243 failed: {SCONTROL_REFUSAL}" in caplog.text
    expected = f"{stopped} No scheduler to requeue with: resume by re-running the command."
    assert capsys.readouterr().err.splitlines()[-1] == expected
    assert read_summary(run_dir)["error"] == expected


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="two gloo ranks on localhost, as srun would start them")
def test_a_rank_that_reads_no_summary_yet_takes_the_stop_from_the_exception(tmp_path: Path) -> None:
    """Only rank 0 writes summary.json; another rank that ends first (or reads it over a slow shared file system)
    still ends as requeued, exit 0, rather than "Training failed" with exit 1 and an error.txt."""
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}, "model": {}})
    checkpoint = str(tmp_path / "checkpoints" / "stopped.ckpt")
    try:
        raise RuntimeError("in the fit loop") from RunStopped(10, checkpoint, True)  # SIGUSR1, requeue
    except RuntimeError as error:
        ended = ending_of(error, cfg)
    assert (ended.exit_code, ended.requeue) == (0, True), str(ended)
    assert f"Stopped by SIGUSR1 for a requeue at epoch ?, step ?: the state is saved in {checkpoint}" in str(
        ended
    )
    assert not (tmp_path / "error.txt").exists()
    stopped = ending_of(RunStopped(15, None, False), cfg)  # SIGTERM before any checkpoint existed
    assert stopped.exit_code == 143 and "Nothing was trained yet, so no checkpoint was written" in str(
        stopped
    )
    assert "saved in None" not in str(stopped)


@pytest.mark.slow
def test_sigusr1_in_a_two_rank_array_task_saves_and_only_rank_0_requeues(tmp_path: Path) -> None:
    bin_dir, log = _fake_scontrol(tmp_path)
    signal_at, stop_step = 4, 5  # the batch in flight when the signal lands finishes, then the state is saved
    # What srun -n 2 sets for the two tasks of array task 4240_2 on one node. MASTER_PORT: a free port, so that
    # concurrent test runs do not collide on the one Lightning derives from the job id.
    shared = {
        **{key: None for key in os.environ if key.startswith(("SLURM_", "SUBMITIT_"))},
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_ARRAY_JOB_ID": "4240",
        "SLURM_ARRAY_TASK_ID": "2",
        "SLURM_JOB_NAME": "pretrain",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "MASTER_PORT": str(_free_port()),
    }
    args = [
        *TINY_OVERRIDES,
        "trainer.max_epochs=4",
        "data.num_workers=0",
        "+trainer.strategy=ddp",
        "trainer.devices=2",
        "+callbacks.sabotage._target_=tests.sabotage.Sabotage",
        f"+callbacks.sabotage.at_step={signal_at}",
        "+callbacks.sabotage.action=signal:SIGUSR1",  # rank 0 signals itself; the ranks agree on the stop
        f"+callbacks.sabotage.marker={tmp_path / 'fired'}",
    ]

    def rank(procid: int):
        env = {**shared, "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid)}
        return run_train(args, cwd=tmp_path, check=False, env_overrides=env)

    with ThreadPoolExecutor(max_workers=2) as pool:
        rank0, rank1 = pool.map(rank, (0, 1))

    # The run directory is named after the array task, so the requeued job resumes in it (not after the time).
    run_dir = tmp_path / "outputs" / "pretrain" / "runs" / "slurm_4240_2"
    message = (
        f"Stopped by SIGUSR1 for a requeue at epoch 1, step {stop_step}: the state is saved in "
        f"{run_dir / 'checkpoints' / 'stopped.ckpt'}, and the requeued job resumes from it in {run_dir}."
    )
    for procid, proc in enumerate((rank0, rank1)):
        assert proc.returncode == 0, f"rank {procid}:\n{proc.stderr[-4000:]}"
        assert message in proc.stderr, f"rank {procid}:\n{proc.stderr[-4000:]}"
        assert "No scheduler to requeue with" not in proc.stderr and "Traceback" not in proc.stderr
    assert "requeued SLURM job 4240_2" in rank0.stderr
    # Once, by rank 0, with the array form of the id: not by rank 1, nor a second time by Lightning's own handler.
    assert _calls(log) == ["procid=0 requeue 4240_2"]
    summary = read_summary(run_dir)
    assert summary["status"] == "requeued" and summary["stop"]["signal"] == "SIGUSR1"
    checkpoint = torch.load(run_dir / "checkpoints" / "stopped.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == stop_step
