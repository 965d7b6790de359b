"""The multirun launcher path on a real SLURM: submission, a failing job, preemption and requeue (no mocks).

A module fixture starts the single-node cluster of ``scripts/slurm/local_cluster.sh`` (slurmctld + slurmd +
munged on localhost; it apt-installs slurm-wlm and munge when they are missing, so it needs root). Where it cannot
start, the tests are skipped, and fail under CI (``CI=true``).

Every launcher runs in its own process group with a hard timeout: without accounting (no ``sacct``) submitit
only sees that a job ended once its result pickle exists, so a job that dies without one leaves the launcher
waiting forever. On a timeout the launcher is killed, its jobs cancelled, and ``squeue`` plus the jobs' logs go
into the failure message.

Run with ``python -m pytest tests/test_slurm.py -q -s`` to see the measured requeue cost and the module's wall
time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from .conftest import ROOT, TINY_OVERRIDES, read_summary

# One worker for every test that installs system packages or binds fixed ports (the cluster's 6817/6818).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("system")]

CLUSTER_SCRIPT = ROOT / "scripts" / "slurm" / "local_cluster.sh"
CLUSTER_START_TIMEOUT = 600  # the first start apt-installs slurm-wlm and munge
LAUNCH_TIMEOUT = 300  # one two-job sweep of tiny runs: about a minute on 2 busy cores

# Through the submitit SLURM launcher, one CPU per job (cluster=cpu), on the test cluster's partition.
SLURM = [
    "-m",
    "hydra/launcher=slurm",
    "cluster=cpu",
    "hydra.launcher.partition=debug",
    "hydra.launcher.timeout_min=10",
]
TINY = [*TINY_OVERRIDES, "data.num_workers=0"]

# Soft selection with three re-selections in four epochs: full (6 steps), then subsets of 9, 24 and 38 samples
# (1, 3 and 4 steps, re-selecting before each); 14 optimizer steps in all.
REQUEUE_RUN = [
    "experiment=smoke",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "data.num_workers=0",
    "trainer.deterministic=true",
    "selection=soft",
    "selection.total_cycles=3",
    "interval.initial=1",
    "interval.max=1",
    "trainer.max_epochs=4",
]
SIGNAL_AT_STEP = 8  # mid-way through the cycle-1 subset epoch (steps 8-10): the cycle-2 selection comes after
STOP_STEP = SIGNAL_AT_STEP + 1  # the batch in flight finishes, then the state is saved
NEVER = 1_000_000  # a step the run never reaches: the sabotage callback does nothing
AT_STEP = "callbacks.sabotage.at_step"

LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"


# ---------------------------------------------------------------------------------------------- the cluster


def _not_available(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"local SLURM cluster unavailable under CI: {reason}")
    pytest.skip(f"local SLURM cluster unavailable: {reason}")


def _cluster(command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), command], capture_output=True, text=True, timeout=timeout
    )


@dataclass
class Cluster:
    data_dir: Path  # the synthetic data, generated once and shared by every job of the module


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Starts the local cluster (unless it already runs), exports SLURM_CONF, stops it at the end."""
    module_start = time.perf_counter()
    if not sys.platform.startswith("linux"):
        _not_available(f"needs Linux, this is {sys.platform}")
    try:
        was_running = _cluster("status", 60).returncode == 0
        started = _cluster("start", CLUSTER_START_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as error:
        _not_available(f"{type(error).__name__}: {error}")
    if started.returncode != 0:
        hint = "" if os.geteuid() == 0 else " (not root: slurm-wlm and munge must be installed and startable)"
        _not_available(
            f"'local_cluster.sh start' exited {started.returncode}{hint}:\n{started.stderr[-3000:]}"
        )
    start_s = time.perf_counter() - module_start
    exports = dict(
        word.split("=", 1) for word in shlex.split(_cluster("env", 30).stdout) if "=" in word
    )  # "export SLURM_CONF=/tmp/attent-slurm/etc/slurm.conf"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in exports.items():
            patch.setenv(key, value)
        yield Cluster(data_dir=tmp_path_factory.mktemp("slurm_data"))
        stop_s = 0.0
        if not was_running:
            stop_start = time.perf_counter()
            stopped = _cluster("stop", 120)
            stop_s = time.perf_counter() - stop_start
            assert stopped.returncode == 0, stopped.stderr[-3000:]
    total = time.perf_counter() - module_start
    print(
        f"\n[slurm] local SLURM tests: module wall time {total:.1f} s "
        f"(cluster start {start_s:.1f} s, stop {stop_s:.1f} s{', left running: it ran before' if was_running else ''})",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------- the launcher


def _job_env(cwd: Path, data_dir: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        # Never inherit an outer SLURM job (a CI runner inside one): run_stamp and the requeue signal read these.
        if not (key.startswith(("SLURM_", "SUBMITIT_")) and key != "SLURM_CONF")
    }
    env.update(
        ATTENT_DATA_DIR=str(data_dir),
        ATTENT_LOG_DIR=str(cwd / "outputs"),
        WANDB_MODE="offline",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
        ),  # tests.sabotage
    )
    return env


def _job_ids(sweep: Path) -> list[str]:
    """The SLURM ids of the sweep's jobs ("41" for one job, "40_0", "40_1" for an array), from submitit's folder."""
    folder = sweep / ".submitit"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / f"{p.name}_submitted.pkl").is_file())


def _quiet(text: str) -> str:
    # Without accounting, submitit warns about sacct on every poll.
    noise = ("Bypassing sacct error", "Slurm accounting storage is disabled")
    return "\n".join(line for line in text.splitlines() if not any(n in line for n in noise))


def _tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def diagnostics(sweep: Path, launcher_output: str = "") -> str:
    """squeue, the sweep's job logs under ``.submitit/`` and the launcher's output, for failure messages."""
    parts = []
    for command in (["squeue", "-o", "%i %j %T %M %R"], ["sinfo", "-N", "-o", "%N %T %c %C %E"]):
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=30)
            parts.append(f"----- {command[0]} -----\n{out.stdout}{out.stderr}")
        except (OSError, subprocess.TimeoutExpired) as error:
            parts.append(f"----- {command[0]} failed: {error}")
    folder = sweep / ".submitit"
    for log in sorted(folder.glob("*/*_log.*")) if folder.is_dir() else []:
        parts.append(
            f"----- {log.relative_to(sweep)} -----\n{_tail(_quiet(log.read_text(errors='replace')))}"
        )
    if launcher_output:
        parts.append(f"----- launcher output -----\n{_tail(_quiet(launcher_output), 6000)}")
    return "\n".join(parts)


class Launcher:
    """``python train.py -m ...`` in its own process group, its output in files (no pipe to fill up)."""

    def __init__(self, args: list[str], *, cwd: Path, sweep: Path, data_dir: Path) -> None:
        self.cwd, self.sweep = cwd, sweep
        self.out_path, self.err_path = cwd / "launcher.out", cwd / "launcher.err"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "train.py"), *args, f"hydra.sweep.dir={sweep}"],
                cwd=cwd,
                env=_job_env(cwd, data_dir),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def diagnostics(self) -> str:
        return diagnostics(self.sweep, self.output)

    def kill(self) -> None:
        """Ends the launcher's process group (TERM, then KILL) and cancels the sweep's jobs."""
        for signum in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        jobs = sorted({job.split("_")[0] for job in _job_ids(self.sweep)})
        if jobs:
            subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)

    def fail(self, message: str) -> None:
        report = self.diagnostics()  # before the kill cancels the jobs: squeue shows where they were
        self.kill()
        pytest.fail(f"{message}\n{report}", pytrace=False)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"the launcher did not finish within {timeout:.0f} s (killed)")
            raise  # not reached: fail() raises

    def wait_for(self, path: Path, timeout: float) -> float:
        """Waits for ``path`` to appear while the launcher runs; returns when it appeared (time.time())."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                self.fail(f"the launcher exited ({self.proc.returncode}) before {path.name} appeared")
            if time.monotonic() > deadline:
                self.fail(f"{path.name} did not appear within {timeout:.0f} s")
            time.sleep(0.1)
        return time.time()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()  # never leave a launcher or its jobs behind, whatever the test did


@pytest.fixture
def launch(slurm_cluster: Cluster, tmp_path: Path) -> Iterator[Any]:
    launchers: list[Launcher] = []

    def _launch(args: list[str], sweep: Path | None = None) -> Launcher:
        launcher = Launcher(
            args, cwd=tmp_path, sweep=sweep or tmp_path / "sweep", data_dir=slurm_cluster.data_dir
        )
        launchers.append(launcher)
        return launcher

    yield _launch
    for launcher in launchers:
        launcher.kill()


def job_dirs(sweep: Path) -> list[Path]:
    """The sweep's job directories (their ``.hydra`` folders mark them; override values with a '/' nest them)."""
    return sorted(p.parent.parent for p in sweep.glob("**/.hydra/hydra.yaml") if ".submitit" not in p.parts)


def hydra_job_id(job_dir: Path) -> str:
    """The job id Hydra's submitit launcher recorded for this job: the SLURM job (array task) id."""
    return str(yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"])


def log_times(path: Path, needle: str) -> list[float]:
    """Epoch times of the log lines containing ``needle``, from their ``[2026-01-02 03:04:05,678]`` stamps."""
    times = []
    for line in path.read_text(errors="replace").splitlines():
        if needle in line:
            start = line.find("[") + 1 if line.startswith("[") else line.find("(") + 1
            stamp = line[start : start + 23]
            times.append(datetime.strptime(stamp, LOG_TIME).timestamp())
    return times


# ---------------------------------------------------------------------------------------------- the tests


def test_a_two_job_sweep_runs_as_slurm_jobs_and_the_report_lists_both(launch, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    with launch([*SLURM, *TINY, "selection=none,random"], sweep) as launcher:
        code = launcher.wait(LAUNCH_TIMEOUT)
        if code != 0:
            launcher.fail(f"the launcher exited {code}")
        slurm_ids = _job_ids(sweep)
        jobs = job_dirs(sweep)
        assert len(slurm_ids) == 2 and len({i.split("_")[0] for i in slurm_ids}) == 1, launcher.diagnostics()
        assert [("selection=none" in j.name, "selection=random" in j.name) for j in jobs] == [
            (True, False),
            (False, True),
        ], jobs
        for job in jobs:
            summary = read_summary(job)
            assert summary["status"] == "finished", (job, summary, launcher.diagnostics())
            # It ran as a SLURM job (array task), and submitit's log of that job says so.
            job_id = hydra_job_id(job)
            assert job_id in slurm_ids, (job_id, slurm_ids)
            log_out = (sweep / ".submitit" / job_id / f"{job_id}_0_log.out").read_text()
            assert f"Starting with JobEnvironment(job_id={job_id}," in log_out
            assert "Job completed successfully" in log_out

    report = subprocess.run(
        [sys.executable, "-m", "attent_vision.tools.report", str(sweep), "--out", str(tmp_path / "report")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    rows = json.loads((tmp_path / "report" / "report.json").read_text())
    assert sorted(row["selection"] for row in rows["rows"]) == ["none", "random"], report.stdout
    assert not rows["failed"], rows["failed"]
    assert "(full data)" in report.stdout and "Random" in report.stdout, report.stdout


def _selections(run_dir: Path) -> list[dict[str, Any]]:
    """The run's selection events without their timings (all that is left depends on what was selected)."""
    lines = (run_dir / "selection.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_time_s")} for line in lines]


def _same_selections(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert len(got) == len(expected), (got, expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys(), (a, b)
        for key in a:
            if isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
            else:
                assert a[key] == b[key], (key, a, b)


def _override(job_dir: Path, key: str) -> str | None:
    """The value the sweep gave ``key`` in this job (from the job's ``.hydra/overrides.yaml``)."""
    for item in yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()):
        name, _, value = str(item).partition("=")
        if name.lstrip("+~") == key:
            return value
    return None


def test_a_preempted_job_is_requeued_resumes_in_its_directory_and_matches_an_uninterrupted_run(
    launch, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    marker = tmp_path / "marker"
    # Two jobs of one config side by side: the first is preempted at step 8, the second (whose step never comes)
    # is the uninterrupted reference.
    sabotage = [
        "+callbacks.sabotage._target_=tests.sabotage.Sabotage",
        f"+callbacks.sabotage.at_step={SIGNAL_AT_STEP},{NEVER}",
        "+callbacks.sabotage.action=marker",
        "+callbacks.sabotage.marker=marker",  # relative to the job's cwd, the launch directory: keeps the dir flat
    ]
    with launch([*SLURM, *REQUEUE_RUN, *sabotage], sweep) as launcher:
        launcher.wait_for(marker, LAUNCH_TIMEOUT)
        signalled = time.time()
        (run_dir,) = [j for j in job_dirs(sweep) if _override(j, AT_STEP) == str(SIGNAL_AT_STEP)]
        job_id = hydra_job_id(run_dir)
        cancel = subprocess.run(
            ["scancel", "--signal=USR2", job_id], capture_output=True, text=True, timeout=30
        )
        if cancel.returncode != 0:
            launcher.fail(f"scancel --signal=USR2 {job_id} failed: {cancel.stderr}")
        code = launcher.wait(LAUNCH_TIMEOUT)
        if code != 0:
            launcher.fail(f"the launcher exited {code}")
        jobs = job_dirs(sweep)
        assert len(jobs) == 2, jobs  # the requeued job came back to its directory
        (reference_dir,) = [j for j in jobs if _override(j, AT_STEP) == str(NEVER)]
        summary = read_summary(run_dir)
        stopped = run_dir / "checkpoints" / "stopped.ckpt"
        sessions = summary.get("sessions", [])
        assert summary["status"] == "finished", (summary, launcher.diagnostics())
        assert [s["status"] for s in sessions] == ["requeued", "finished"], launcher.diagnostics()
        assert summary["restarts"] == 1 and sessions[1]["resumed_from"] == str(stopped), sessions
        assert summary["optimizer_steps"] == 14 and [h["epoch"] for h in summary["history"]] == [0, 1, 2, 3]
        ckpt = torch.load(stopped, map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == STOP_STEP  # the batch in flight finished, then the state was saved
        # submitit requeued it (not Lightning, not a new job): the same SLURM job ran twice.
        log_out = sweep / ".submitit" / job_id / f"{job_id}_0_log.out"
        log_err = sweep / ".submitit" / job_id / f"{job_id}_0_log.err"
        starts = log_times(log_out, f"Starting with JobEnvironment(job_id={job_id},")
        assert len(starts) == 2, launcher.diagnostics()
        requeued = log_times(log_err, f"Requeued job {job_id}")
        assert len(requeued) == 1, launcher.diagnostics()
        resumed = log_times(log_err, f"Resuming from checkpoints/stopped.ckpt (epoch 2, step {STOP_STEP})")
        assert len(resumed) == 1, launcher.diagnostics()
        reference = read_summary(reference_dir)
        assert reference["status"] == "finished" and reference["restarts"] == 0, reference

    # The cost of the requeue, from the moment the signal was sent. The second session's fit started
    # fit_time_s before it wrote summary.json (at the end of its fit).
    fit_again = (run_dir / "summary.json").stat().st_mtime - summary["fit_time_s"]
    costs = {
        "state saved (stopped.ckpt written)": stopped.stat().st_mtime - signalled,
        "requeued by submitit (scontrol requeue)": requeued[0] - signalled,
        "job running again (2nd process starts)": starts[1] - signalled,
        "'Resuming from' logged (config + checkpoint found)": resumed[0] - signalled,
        "training again (2nd session's fit starts)": fit_again - signalled,
    }
    print("\n[slurm] requeue cost, seconds after `scancel --signal=USR2`:")
    for what, seconds in costs.items():
        print(f"[slurm]   {what:<52} {seconds:6.1f} s")
    print(
        f"[slurm]   session wall times {[s['wall_time_s'] for s in sessions]} s; "
        f"uninterrupted reference {reference['wall_time_s']} s",
        flush=True,
    )
    assert (
        0 < costs["state saved (stopped.ckpt written)"] < costs["training again (2nd session's fit starts)"]
    )

    # The same selections and the same final losses as without the interruption.
    selections = _selections(run_dir)
    assert len(selections) == 3  # cycles 0 and 1 before the stop, cycle 2 after the resume
    _same_selections(selections, _selections(reference_dir))
    for key in ("final_train_loss", "final_val_loss"):
        assert summary[key] == pytest.approx(reference[key], rel=1e-5), key


def test_a_failing_job_surfaces_its_error_while_the_other_finishes(launch, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    error = "ratio.initial: 1.5 is outside (0, 1]"
    with launch([*SLURM, *TINY, "trainer.max_epochs=1", "ratio.initial=1.5,0.3"], sweep) as launcher:
        code = launcher.wait(LAUNCH_TIMEOUT)
        assert code != 0, launcher.diagnostics()  # the sweep reports the failed job, after waiting for all
        summaries = {job.name: read_summary(job) for job in job_dirs(sweep)}
        bad = next(s for name, s in summaries.items() if "ratio.initial=1.5" in name)
        good = next(s for name, s in summaries.items() if "ratio.initial=0.3" in name)
        assert bad["status"] == "failed" and error in bad["error"], bad
        assert good["status"] == "finished", (good, launcher.diagnostics())
        assert error in launcher.output, launcher.diagnostics()


def test_srun_starts_two_ddp_ranks_that_share_one_run_directory(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    """The plain-sbatch path's launch, for real: ``srun`` starts one train.py per task and Lightning's SLURM
    environment wires them into one DDP group (docs/running.md "Several GPUs and nodes")."""
    # Two tasks of one CPU each must fit on the node, or srun waits for ever ("PartitionConfig").
    cpus = subprocess.run(
        ["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, timeout=30
    ).stdout.split()
    assert cpus and int(cpus[0]) >= 2, (
        f"the local cluster's node advertises {cpus} CPUs, the test needs 2: restart it "
        "(scripts/slurm/local_cluster.sh stop; start) or set SLURM_LOCAL_CPUS=2"
    )
    name = f"attent-srun-{os.getpid()}"
    srun = [
        "srun",
        f"--job-name={name}",
        "--partition=debug",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
    ]
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=1"]
    try:
        proc = subprocess.run(
            [*srun, "--time=10", sys.executable, str(ROOT / "train.py"), *TINY, *ddp],
            cwd=tmp_path,
            env=_job_env(tmp_path, slurm_cluster.data_dir),
            stdin=subprocess.DEVNULL,  # srun forwards its stdin to the first task
            capture_output=True,
            text=True,
            timeout=LAUNCH_TIMEOUT,
        )
    except subprocess.TimeoutExpired as error:
        report = diagnostics(tmp_path, f"{error.stdout or ''}\n{error.stderr or ''}")
        subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=30)
        pytest.fail(f"srun did not finish within {LAUNCH_TIMEOUT} s (cancelled)\n{report}", pytrace=False)
    assert proc.returncode == 0, f"srun exited {proc.returncode}:\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}"
    # One directory, named by the job id (a requeued job comes back to it), whatever rank composed its config.
    (run,) = (tmp_path / "outputs" / "pretrain" / "runs").iterdir()
    assert run.name.startswith("slurm_"), run
    summary = read_summary(run)
    assert summary["status"] == "finished"
    assert summary["samples_seen"] == 16 * summary["optimizer_steps"] > 0  # 8 images per task, two tasks
    assert (run / "pretrain.log").is_file() and (run / "pretrain.rank1.log").is_file()
