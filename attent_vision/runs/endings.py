"""How a run that did not finish ended: the one-paragraph message and the exit status the command line reports."""

from __future__ import annotations

import json
import signal
import traceback
from pathlib import Path

from omegaconf import DictConfig

from attent_vision.data.validate import clean_worker_error
from attent_vision.runs.checkpointing import NoLoadableCheckpointError, find_resume_checkpoint
from attent_vision.runs.stops import RunStopped


class RunEnded(Exception):
    """How a run that did not finish ended: a one-paragraph message and the process's exit status."""

    def __init__(self, message: str, exit_code: int, *, requeue: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.requeue = requeue


def _chain(error: BaseException | None) -> list[BaseException]:
    """The exception and the ones it was raised from or during."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def ending_of(error: BaseException, cfg: DictConfig) -> RunEnded:
    """Turns an exception out of ``trainer.fit`` into a message and an exit status, from what the run recorded."""
    run_dir = Path(cfg.paths.output_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    status = summary.get("status", "failed")
    stop = summary.get("stop") or {}
    stopped = next((e for e in _chain(error) if isinstance(e, RunStopped)), None)
    if stopped is not None and status not in ("stopped", "requeued"):
        # Only rank 0 writes summary.json; another rank (or rank 0 before the write) knows the stop from the
        # exception itself.
        status = "requeued" if stopped.requeue else "stopped"
        stop = {"signal": signal.Signals(stopped.signum).name, "checkpoint": stopped.checkpoint, **stop}
    where = f"epoch {summary.get('epochs', '?')}, step {summary.get('optimizer_steps', '?')}"
    rerun = f"re-running the same command with hydra.run.dir={run_dir} resumes from it"
    try:
        last_good = find_resume_checkpoint(run_dir)
    except NoLoadableCheckpointError:
        last_good = None
    if status in ("stopped", "requeued"):
        name = stop.get("signal", "a signal")
        signum = getattr(signal, name, signal.SIGTERM)
        saved = stop.get("checkpoint")
        if status == "requeued":
            state = (
                f"the state is saved in {saved}, and the requeued job resumes from it"
                if saved
                else ("nothing was trained yet (no checkpoint), and the requeued job starts afresh")
            )
            return RunEnded(
                f"Stopped by {name} for a requeue at {where}: {state} in {run_dir}.", 0, requeue=True
            )
        state = (
            f"The state is saved in {saved}; {rerun}"
            if saved
            else (
                "Nothing was trained yet, so no checkpoint was written; re-running the command starts afresh"
            )
        )
        return RunEnded(
            f"Stopped by {name} at {where}. {state}. (SLURM sends SIGTERM when a job reaches its time limit: raise "
            "the time, or let jobs requeue, see 'Run on a cluster' in the README.)",
            128 + int(signum),
        )
    error_text = summary.get("error") or f"{type(error).__name__}: {error}"
    if "DataFormatError" in f"{type(error).__name__} {error} {error_text}":
        # A file that went bad after the start-up check, or a loader worker's error: name the file, nothing else.
        saved = stop.get("checkpoint")
        state = f" The state is saved in {saved}; {rerun}." if saved else ""
        return RunEnded(
            f"A data file failed to load at {where}: {clean_worker_error(error)}. Fix or remove it.{state}", 1
        )
    if status == "diverged":
        good = (
            f"The last good checkpoint is {last_good.describe(run_dir)}; {rerun}, with its learning rate."
            if last_good is not None
            else "No checkpoint was written before that, so there is nothing to resume."
        )
        return RunEnded(
            f"The training loss became non-finite at {where} ({error_text.split(': ', 1)[-1].split('. ')[0]}). "
            f"The diverged state is kept apart in {stop.get('checkpoint')} and is never resumed from. {good} "
            f"To train differently, lower model.blr (now {cfg.model.get('blr') if 'model' in cfg else '?'}) or set "
            "trainer.gradient_clip_val=1.0, and start a fresh run directory (or pass resume=restart), since a "
            "resumed run restores the optimizer's learning rate.",
            1,
        )
    (run_dir / "error.txt").write_text("".join(traceback.format_exception(error)))
    saved = stop.get("checkpoint") or (str(last_good.path) if last_good is not None else None)
    state = (
        f"The state at that moment is saved in {saved}; fix the cause and {rerun}."
        if saved
        else ("Nothing was trained yet, so no checkpoint was written.")
    )
    return RunEnded(
        f"Training failed at {where} with {error_text}. {state} The traceback is in {run_dir / 'error.txt'}.",
        1,
    )
