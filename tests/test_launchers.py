"""The documented ways to start DDP, each run for real on CPU (gloo): Lightning's own launcher (``python train.py
trainer=ddp``, which re-runs the script once per device: the command for 8 GPUs on one node), ``torchrun`` on one
node, and ``torchrun`` over two "nodes" (two launchers meeting at a rendezvous on localhost). ``srun`` is in
tests/test_slurm.py, on the local SLURM cluster.

The same seed, data and global batch must give the same run whichever launcher started it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from .conftest import ROOT, read_summary

pytestmark = pytest.mark.slow

DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
SMOKE = ["experiment=smoke", "data.num_workers=0"]


def _env(cwd: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "ATTENT_DATA_DIR": str(cwd / "data"),
        "ATTENT_LOG_DIR": str(cwd / "outputs"),
        "WANDB_MODE": "offline",
        "PYTHONWARNINGS": "ignore",
    }
    for var in [v for v in env if v.startswith(("SLURM_", "TORCHELASTIC_"))]:
        env.pop(var)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Launch(NamedTuple):
    proc: subprocess.Popen
    out: Path
    err: Path


def _check(launches: list[Launch], timeout: int = 300) -> None:
    for launch in launches:
        launch.proc.wait(timeout=timeout)
    for proc, out, err in launches:
        assert proc.returncode == 0, (
            f"{proc.args} failed ({proc.returncode}):\n{out.read_text()[-3000:]}\n{err.read_text()[-6000:]}"
        )


def _one_run(cwd: Path) -> Path:
    runs = list((cwd / "outputs" / "pretrain" / "runs").iterdir())
    assert len(runs) == 1, f"the ranks wrote {len(runs)} run directories: {runs}"
    return runs[0]


def _start(args: list[str], cwd: Path) -> Launch:
    """Starts a launcher with its output in files: a pipe left unread while the test waits for another launcher
    could fill up and stall that rank, and with it the whole DDP group."""
    logs = cwd / "launcher_logs"
    logs.mkdir(exist_ok=True)
    index = len(list(logs.glob("*.out")))
    out, err = logs / f"{index}.out", logs / f"{index}.err"
    with out.open("w") as out_file, err.open("w") as err_file:
        proc = subprocess.Popen(args, cwd=cwd, env=_env(cwd), stdout=out_file, stderr=err_file)
    return Launch(proc, out, err)


@pytest.fixture(scope="module")
def lightning_launched(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``python train.py trainer=ddp trainer.devices=2``: Lightning starts the second process itself."""
    cwd = tmp_path_factory.mktemp("lightning_ddp")
    _check([_start([sys.executable, str(ROOT / "train.py"), *SMOKE, *DDP_CPU, "trainer.devices=2"], cwd)])
    run = _one_run(cwd)
    # Hydra's file log: the first process writes pretrain.log, the re-run one pretrain.rank1.log beside it.
    assert (run / "pretrain.log").is_file() and (run / "pretrain.rank1.log").is_file()
    return read_summary(run)


def test_lightning_launched_ddp_runs_two_ranks(lightning_launched: dict) -> None:
    summary = lightning_launched
    assert summary["status"] == "finished"
    # The smoke preset's 8 images per device on two ranks: a global batch of 16 per optimizer step.
    assert summary["samples_seen"] == 16 * summary["optimizer_steps"] > 0


def test_torchrun_on_one_node_matches_lightnings_launcher(lightning_launched: dict, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _check([_start([*command, str(ROOT / "train.py"), *SMOKE, *DDP_CPU, "trainer.devices=2"], tmp_path)])
    run = _one_run(tmp_path)
    assert (run / "pretrain.rank1.log").is_file()
    summary = read_summary(run)
    assert summary["status"] == "finished"
    for key in ("optimizer_steps", "samples_seen", "final_train_loss", "final_val_loss"):
        assert summary[key] == pytest.approx(lightning_launched[key], rel=1e-6), key


def test_torchrun_over_two_nodes_meets_at_the_rendezvous(lightning_launched: dict, tmp_path: Path) -> None:
    """Two torchrun launchers, one process each (``trainer.num_nodes=2 trainer.devices=1``), as on two hosts."""
    endpoint = f"127.0.0.1:{_free_port()}"
    rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=job42"]
    procs = [
        _start(
            [
                *[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"],
                *rendezvous,
                f"--node-rank={node}",
                str(ROOT / "train.py"),
                *SMOKE,
                *DDP_CPU,
                "trainer.devices=1",
                "trainer.num_nodes=2",
            ],
            tmp_path,
        )
        for node in (0, 1)
    ]
    _check(procs)
    # Hosts share the output folder on a cluster: the rendezvous id, the same on every node, names the run.
    run = _one_run(tmp_path)
    assert run.name == "torchrun_job42"
    summary = read_summary(run)
    assert summary["status"] == "finished"
    for key in ("optimizer_steps", "samples_seen", "final_train_loss", "final_val_loss"):
        assert summary[key] == pytest.approx(lightning_launched[key], rel=1e-6), key
