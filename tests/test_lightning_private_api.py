"""The private (and undocumented internal) Lightning APIs this project relies on are still there.

A Lightning upgrade may rename or remove any of these without a deprecation. Several are hooks that the project
overrides, where a rename does not fail at all: the override is silently never called again. This test names each
one, so that an upgrade which breaks it fails here, by name, instead of somewhere deep in a run (or not at all).

Where each is used (file: function or class):

- ``lightning.pytorch.strategies.launchers.multiprocessing._MultiProcessingLauncher`` (a private class, the
  ``ddp_spawn`` launcher): ``attent_vision/runs/stops.py``: ``is_spawn_parent``, ``_CrashAwareSpawnLauncher``,
  ``CrashSafeSpawnDDPStrategy._configure_launcher``, ``forward_signals_to_workers``;
  ``attent_vision/runs/callbacks.py``: ``SpawnedProcessGroupCleanup.teardown``.
- ``_MultiProcessingLauncher._wrapping_function(process_idx, trainer, ...)`` (overridden):
  ``attent_vision/runs/stops.py``: ``_CrashAwareSpawnLauncher._wrapping_function``.
- ``_MultiProcessingLauncher.procs`` (read with a default, so a rename would silently forward no signal):
  ``attent_vision/runs/stops.py``: ``forward_signals_to_workers``.
- ``lightning.pytorch.trainer.call._call_callback_hooks``: ``attent_vision/runs/stops.py``:
  ``_CrashAwareSpawnLauncher._wrapping_function``.
- ``DDPStrategy._configure_launcher`` (overridden), ``DDPStrategy._launcher``, ``DDPStrategy._start_method``:
  ``attent_vision/runs/stops.py``: ``CrashSafeSpawnDDPStrategy._configure_launcher``.
- ``Trainer._checkpoint_connector.dump_checkpoint(weights_only=...)``: ``attent_vision/runs/stops.py``:
  ``GracefulStop.on_exception``, ``GracefulStop.stop_if_requested``.
- ``Trainer.fit_loop.epoch_loop.batch_progress.is_last_batch`` (not underscored, but loop internals):
  ``attent_vision/runs/stops.py``: ``GracefulStop.on_train_batch_end``.
- ``Trainer.fit_loop.epoch_loop._should_accumulate()``: ``attent_vision/runs/stops.py``:
  ``GracefulStop.on_train_batch_end`` (stops wait for the end of an accumulated step).
- ``Trainer.fit_loop.epoch_loop.batch_progress.current.processed``: ``attent_vision/lightning/pretrain.py`` and
  ``attent_vision/selection/teacher.py`` (batches already trained in the epoch, under accumulation and resume).
- ``WeightAveraging._swap_models`` (overridden), ``WeightAveraging._average_model`` (a torch ``AveragedModel``
  with ``n_averaged``): ``attent_vision/runs/callbacks.py``: ``EMAWeights``.
- The checkpoint's loop state, ``checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]`` with its
  ``total``/``current`` counters (``ready``, ``started``, ``processed``, ``completed``) and ``is_last_batch``:
  ``attent_vision/runs/stops.py``: ``validation_not_run``.
- The checkpoint's ``checkpoint["loops"]["fit_loop"]["epoch_progress"]`` with the same four counters in ``total``
  and ``current``: ``attent_vision/runs/stops.py``: ``epoch_not_started``.
- ``Trainer._signal_connector._original_handlers`` (a dict of the handlers Lightning puts back after a fit):
  ``attent_vision/runs/stops.py``: ``GracefulStop.on_train_start``.
- ``Trainer._accelerator_connector.use_distributed_sampler``: ``attent_vision/selection/contracts.py``:
  ``trainer_problems``.
- ``LightningModule._trainer``: ``attent_vision/lightning/pretrain.py``: ``MultiMAEPretrainModule.training_step``.
- ``ModelCheckpoint._remove_checkpoint(trainer, filepath)``, ``ModelCheckpoint._link_checkpoint(trainer,
  filepath, linkpath)`` and ``ModelCheckpoint._save_checkpoint(trainer, filepath)`` (all overridden), and
  ``ModelCheckpoint._last_checkpoint_saved`` (the newest file written): ``attent_vision/runs/checkpointing.py``:
  ``SafeModelCheckpoint``.
- ``lightning.pytorch.plugins.io.AsyncCheckpointIO``'s ``_executor``, ``_error``, ``_ensure_setup()`` and
  ``checkpoint_io`` (subclassed): ``attent_vision/runs/checkpointing.py``: ``AsyncAtomicCheckpointIO``.
- ``ExperimentWriter._check_log_dir_exists`` (overridden; Lightning calls it from ``__init__``),
  ``ExperimentWriter._fs``, ``.metrics_file_path``, ``.metrics_keys`` (the writer's base class is the private
  ``lightning.fabric.loggers.csv_logs._ExperimentWriter``): ``attent_vision/runs/loggers.py``:
  ``_AppendingExperimentWriter``.
- ``CSVLogger._experiment``, ``CSVLogger._fs``: ``attent_vision/runs/loggers.py``:
  ``ResumableCSVLogger.experiment``.
- ``lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler`` (not underscored, but an undocumented
  internal module): ``attent_vision/data/downstream.py`` (module import).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path

import lightning
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.strategies import DDPStrategy


def _import(module: str, name: str) -> object:
    return getattr(importlib.import_module(module), name)


def _parameters(function: Callable) -> list[str]:
    return list(inspect.signature(function).parameters)


def _cpu_trainer(**kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _check_multiprocessing_launcher() -> None:
    launcher_cls = _import(
        "lightning.pytorch.strategies.launchers.multiprocessing", "_MultiProcessingLauncher"
    )
    # is_spawn_parent and forward_signals_to_workers recognise ddp_spawn by this class.
    launcher = _cpu_trainer(strategy="ddp_spawn", devices=2).strategy.launcher
    assert isinstance(launcher, launcher_cls), f"ddp_spawn's launcher is a {type(launcher).__name__}"


def _check_wrapping_function() -> None:
    launcher_cls = _import(
        "lightning.pytorch.strategies.launchers.multiprocessing", "_MultiProcessingLauncher"
    )
    # The override takes (process_idx, trainer, *args, **kwargs) and calls hooks on that trainer.
    assert _parameters(launcher_cls._wrapping_function)[1:3] == ["process_idx", "trainer"], (
        f"parameters are {_parameters(launcher_cls._wrapping_function)}"
    )


def _check_launcher_procs() -> None:
    launcher = _cpu_trainer(strategy="ddp_spawn", devices=2).strategy.launcher
    assert isinstance(launcher.procs, list), f"procs is a {type(launcher.procs).__name__}"


def _check_call_callback_hooks() -> None:
    hooks = _import("lightning.pytorch.trainer.call", "_call_callback_hooks")
    assert _parameters(hooks)[:2] == ["trainer", "hook_name"], f"parameters are {_parameters(hooks)}"


def _check_configure_launcher() -> None:
    from attent_vision.runs.stops import CrashSafeSpawnDDPStrategy, _CrashAwareSpawnLauncher

    assert callable(DDPStrategy._configure_launcher)
    strategy = CrashSafeSpawnDDPStrategy(process_group_backend="gloo")
    assert strategy._start_method == "spawn"
    # Lightning calls the hook while it builds the Trainer, and ``strategy.launcher`` reads ``_launcher``.
    trainer = _cpu_trainer(strategy=strategy, devices=2)
    assert isinstance(trainer.strategy.launcher, _CrashAwareSpawnLauncher), (
        f"the launcher is a {type(trainer.strategy.launcher).__name__}: the override was not called"
    )
    assert trainer.strategy._launcher is trainer.strategy.launcher


class _LastBatchProbe(pl.Callback):
    """Records ``fit_loop.epoch_loop.batch_progress.is_last_batch`` after every training batch."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object, **kwargs: object) -> None:
        self.seen.append(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


@functools.cache
def _fitted() -> tuple[pl.Trainer, _LastBatchProbe]:
    """A trainer after one epoch of two training batches and one validation batch (Lightning's BoringModel)."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    probe = _LastBatchProbe()
    trainer = _cpu_trainer(
        devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[probe]
    )
    trainer.fit(BoringModel())
    return trainer, probe


def _check_checkpoint_connector() -> None:
    checkpoint = _fitted()[0]._checkpoint_connector.dump_checkpoint(weights_only=False)
    assert checkpoint["global_step"] == 2 and "state_dict" in checkpoint, sorted(checkpoint)


def _check_is_last_batch() -> None:
    assert _fitted()[1].seen == [False, True], f"is_last_batch read {_fitted()[1].seen} over two batches"


def _check_epoch_loop_accumulation() -> None:
    epoch_loop = _fitted()[0].fit_loop.epoch_loop
    assert epoch_loop.batch_progress.current.processed == 2
    assert epoch_loop._should_accumulate() is False  # one batch per step: never between the batches of a step


def _check_weight_averaging() -> None:
    from lightning.pytorch.callbacks import WeightAveraging

    assert callable(WeightAveraging._swap_models)
    callback = WeightAveraging()
    assert callback._average_model is None  # set up in setup(); EMAWeights reads it and its n_averaged


def _check_validation_progress_layout() -> None:
    checkpoint = _fitted()[0]._checkpoint_connector.dump_checkpoint(weights_only=False)
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
    counters = {"ready", "started", "processed", "completed"}
    assert set(progress["total"]) == counters and set(progress["current"]) == counters, progress
    assert progress["total"]["completed"] == 1 and progress["is_last_batch"] is True, progress


def _check_epoch_progress_layout() -> None:
    checkpoint = _fitted()[0]._checkpoint_connector.dump_checkpoint(weights_only=False)
    progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]
    counters = {"ready", "started", "processed", "completed"}
    assert set(progress["total"]) == counters and set(progress["current"]) == counters, progress


def _check_signal_connector() -> None:
    # GracefulStop.on_train_start corrects this dict so that a finished fit puts back the pre-fit handlers.
    handlers = _cpu_trainer(devices=1)._signal_connector._original_handlers
    assert isinstance(handlers, dict), f"_original_handlers is a {type(handlers).__name__}"


def _check_accelerator_connector() -> None:
    # trainer_problems reads the Trainer's use_distributed_sampler argument from here.
    for value in (True, False):
        connector = _cpu_trainer(devices=1, use_distributed_sampler=value)._accelerator_connector
        assert connector.use_distributed_sampler is value, f"use_distributed_sampler={value} reads back wrong"


def _check_module_trainer() -> None:
    module = pl.LightningModule()
    assert module._trainer is None, "an unattached module's _trainer is not None"
    trainer = _cpu_trainer(devices=1)
    module.trainer = trainer
    assert module._trainer is trainer, "attaching a trainer does not set _trainer"


def _check_remove_checkpoint() -> None:
    assert _parameters(ModelCheckpoint._remove_checkpoint) == ["self", "trainer", "filepath"], (
        f"parameters are {_parameters(ModelCheckpoint._remove_checkpoint)}"
    )


def _check_link_checkpoint() -> None:
    assert _parameters(ModelCheckpoint._link_checkpoint) == ["trainer", "filepath", "linkpath"], (
        f"parameters are {_parameters(ModelCheckpoint._link_checkpoint)}"
    )


def _check_save_checkpoint_and_last_saved(tmp_path: Path) -> None:
    assert _parameters(ModelCheckpoint._save_checkpoint) == ["self", "trainer", "filepath"], (
        f"parameters are {_parameters(ModelCheckpoint._save_checkpoint)}"
    )
    callback = ModelCheckpoint(dirpath=tmp_path)
    assert callback._last_checkpoint_saved == "", "ModelCheckpoint has no _last_checkpoint_saved"


def _check_async_checkpoint_io() -> None:
    from attent_vision.runs.checkpointing import AsyncAtomicCheckpointIO, AtomicCheckpointIO

    io = AsyncAtomicCheckpointIO()
    assert io._executor is None and io._error is None
    assert isinstance(io.checkpoint_io, AtomicCheckpointIO)
    io._ensure_setup()  # Lightning's lazy start of the writer thread
    assert io._executor.submit(lambda: 7).result(timeout=10) == 7, "_ensure_setup started no usable executor"
    io.teardown()


def _check_experiment_writer(tmp_path: Path) -> None:
    from attent_vision.runs.loggers import _AppendingExperimentWriter

    assert callable(ExperimentWriter._check_log_dir_exists)
    log_dir = tmp_path / "csv"
    log_dir.mkdir()
    (log_dir / "metrics.csv").write_text("step,train/loss\n0,1.5\n")
    writer = _AppendingExperimentWriter(log_dir=str(log_dir))
    # The override ran from __init__ (through _fs, metrics_file_path and metrics_keys): the file and its header stay.
    assert writer.metrics_file_path == str(log_dir / "metrics.csv")
    assert writer._fs.isfile(writer.metrics_file_path), "the existing metrics.csv was deleted"
    assert writer.metrics_keys == ["step", "train/loss"], f"metrics_keys are {writer.metrics_keys}"


def _check_csv_logger(tmp_path: Path) -> None:
    from attent_vision.runs.loggers import ResumableCSVLogger, _AppendingExperimentWriter

    logger = CSVLogger(save_dir=str(tmp_path / "plain"))
    assert logger._experiment is None and logger._fs is not None
    resumable = ResumableCSVLogger(save_dir=str(tmp_path / "resumable"))
    assert isinstance(resumable.experiment, _AppendingExperimentWriter)


def _check_unrepeated_sampler() -> None:
    _import("lightning.pytorch.overrides.distributed", "UnrepeatedDistributedSampler")


def test_every_private_lightning_api_the_project_uses_is_still_there(tmp_path: Path) -> None:
    checks: dict[str, Callable[[], None]] = {
        "lightning.pytorch.strategies.launchers.multiprocessing._MultiProcessingLauncher": (
            _check_multiprocessing_launcher
        ),
        "_MultiProcessingLauncher._wrapping_function": _check_wrapping_function,
        "_MultiProcessingLauncher.procs": _check_launcher_procs,
        "lightning.pytorch.trainer.call._call_callback_hooks": _check_call_callback_hooks,
        "DDPStrategy._configure_launcher / ._launcher / ._start_method": _check_configure_launcher,
        "Trainer._checkpoint_connector.dump_checkpoint": _check_checkpoint_connector,
        "Trainer.fit_loop.epoch_loop.batch_progress.is_last_batch": _check_is_last_batch,
        "fit_loop.epoch_loop._should_accumulate / .batch_progress.current.processed": _check_epoch_loop_accumulation,
        "WeightAveraging._swap_models / ._average_model": _check_weight_averaging,
        'checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]': _check_validation_progress_layout,
        'checkpoint["loops"]["fit_loop"]["epoch_progress"]': _check_epoch_progress_layout,
        "Trainer._signal_connector._original_handlers": _check_signal_connector,
        "Trainer._accelerator_connector.use_distributed_sampler": _check_accelerator_connector,
        "LightningModule._trainer": _check_module_trainer,
        "ModelCheckpoint._remove_checkpoint": _check_remove_checkpoint,
        "ModelCheckpoint._link_checkpoint": _check_link_checkpoint,
        "ModelCheckpoint._save_checkpoint / ._last_checkpoint_saved": lambda: (
            _check_save_checkpoint_and_last_saved(tmp_path)
        ),
        "AsyncCheckpointIO._executor / ._error / ._ensure_setup / .checkpoint_io": _check_async_checkpoint_io,
        "ExperimentWriter._check_log_dir_exists / ._fs / .metrics_file_path / .metrics_keys": (
            lambda: _check_experiment_writer(tmp_path)
        ),
        "CSVLogger._experiment / ._fs": lambda: _check_csv_logger(tmp_path),
        "lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler": _check_unrepeated_sampler,
    }
    missing = []
    for name, check in checks.items():
        try:
            check()
        except Exception as error:  # any failure, an ImportError or AttributeError included, names the API
            missing.append(f"{name}: {type(error).__name__}: {error}")
    assert not missing, (
        f"Lightning {lightning.__version__} changed private APIs this project relies on (see this module's "
        "docstring for where each is used):\n" + "\n".join(missing)
    )
