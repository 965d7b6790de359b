"""What ``finetune.py probe=knn|linear`` does: probe a frozen (pretrained or random) encoder and summarise.

The run builds the data and the task module exactly as fine-tuning does and loads the encoder with the same function,
then computes the encoder's features of both splits once (evaluation transforms, no augmentation) and fits the
probe on them (:mod:`attent_vision.lightning.probes`). It writes ``summary.json`` with fine-tuning's fields and metric
names (``status``, ``task``, ``metrics`` {main, final, best}, ``chance``, ``settings``, ``pretrained_checkpoint``,
``wall_time_s``) plus ``probe``, and records the main metric in the pretraining run's ``downstream.json`` under the
probe's own column (``probe.report_column``, e.g. "ImageNetS50 (k-NN)"), beside the fine-tuning results.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from attent_vision.lightning.finetune import FinetuneModule
from attent_vision.lightning.probes import Features, ProbeResult, extract_features
from attent_vision.models.attention import configure_attention, precision_kind
from attent_vision.models.checkpoint import LoadReport
from attent_vision.runs.downstream import (
    load_encoder,
    pretraining_run_dir,
    print_result,
    record_downstream,
    resolve_pretrained,
    run_settings,
)
from attent_vision.runs.kit import check_data

log = logging.getLogger(__name__)

__all__ = ["ProbeSetup", "evaluation_loader", "prepare_probe", "probe_device", "probe_encoder", "run_probe"]

# Fine-tuning settings that a probe does not use (its own are under settings.probe).
_FINETUNE_ONLY = ("batch_size", "max_epochs", "lr", "blr", "layer_decay")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ProbeSetup:
    """What a probe run builds before probing: the data, the task module with its encoder, and the probe."""

    cfg: DictConfig
    output_dir: Path
    datamodule: Any
    module: FinetuneModule
    probe: Any  # KNNProbe | LinearProbe
    source: Path | None = None
    report: LoadReport | None = None


def prepare_probe(cfg: DictConfig) -> ProbeSetup:
    """Builds the data, the module (its encoder loaded as fine-tuning loads it, or random) and the probe."""
    source = resolve_pretrained(cfg)
    pl.seed_everything(cfg.seed, workers=True)  # also fixes the random init of a from-scratch probe
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    check_data(cfg, datamodule, min_size=int(cfg.encoder.patch_size))
    datamodule.setup("fit")
    module = hydra.utils.instantiate(cfg.module, _convert_="all")
    report = None
    if source is not None:
        report = load_encoder(module.net, source, output_dir)
    else:
        log.info("no pretrained weights: probing a randomly initialised encoder")
    probe = hydra.utils.instantiate(cfg.probe.method, _convert_="all")
    return ProbeSetup(
        cfg=cfg,
        output_dir=output_dir,
        datamodule=datamodule,
        module=module,
        probe=probe,
        source=source,
        report=report,
    )


def probe_device(cfg: DictConfig) -> tuple[torch.device, str]:
    """The device and precision of the trainer config: CUDA when the accelerator allows it and one is present."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = str(cfg.trainer.get("precision", "32-true")) if cuda else "32-true"
    return device, precision


def evaluation_loader(datamodule: Any, split: str) -> DataLoader:
    """A split in dataset order with the evaluation transform, the training split included.

    Without augmentation the features are a deterministic function of the encoder, so one pass suffices.
    """
    dataset = copy.copy(
        getattr(datamodule, f"{split}_set")
    )  # shares the file list; only the transform differs
    dataset.transform = datamodule.eval_transform
    return DataLoader(
        dataset,
        batch_size=datamodule.eval_batch_size,
        shuffle=False,
        num_workers=datamodule.num_workers,
        pin_memory=datamodule.pin_memory,
    )


def probe_encoder(setup: ProbeSetup) -> tuple[ProbeResult, dict[str, Any]]:
    """Freezes the encoder, computes both splits' features once and fits and evaluates the probe on them.

    Returns:
        The probe's result and the run facts for summary.json (feature shapes and times, device, precision).
    """
    cfg, module, probe = setup.cfg, setup.module, setup.probe
    device, precision = probe_device(cfg)
    module.requires_grad_(False)
    module.eval()  # no drop path; the encoder has no batch statistics to update
    module.to(device)
    configure_attention(module.net, module.attention, device_type=device.type, precision=precision)
    kind = probe.feature_kind(module)
    start = time.perf_counter()
    splits: dict[str, Features] = {
        split: extract_features(
            module,
            evaluation_loader(setup.datamodule, split),
            kind=kind,
            patch_size=int(cfg.encoder.patch_size),
            device=device,
            autocast_dtype=_AUTOCAST.get(precision_kind(precision)),
            split=split,
            log_every_s=float(cfg.probe.get("log_every_s", 30.0)),
        )
        for split in ("train", "val")
    }
    feature_time = time.perf_counter() - start
    result = probe.fit_evaluate(splits["train"], splits["val"], module=module, device=device)
    facts = {
        "feature_kind": kind,
        "feature_shape": list(splits["train"].features.shape[1:]),
        "train_samples": len(splits["train"]),
        "val_samples": len(splits["val"]),
        "feature_time_s": round(feature_time, 3),
        "fit_time_s": round(result.fit_time_s, 3),
        "device": device.type,
        "precision": precision,
    }
    return result, facts


def _metrics(main: str, result: ProbeResult) -> dict[str, Any]:
    metrics: dict[str, Any] = {"main": main, "final": result.final}
    scored = [h for h in result.history if h.get(main) is not None]
    if scored:  # the linear probe's evaluated epochs; the k-NN probe has a single result
        best = max(scored, key=lambda h: h[main])
        metrics["best"] = {k: v for k, v in best.items() if k not in ("epoch", "train_loss")}
        metrics["best_epoch"] = best["epoch"]
    return metrics


def run_probe(cfg: DictConfig) -> float | None:
    """Probes the configured encoder; returns the task's main metric (also in summary.json and downstream.json)."""
    run_start = time.perf_counter()
    setup = prepare_probe(cfg)
    module, probe, output_dir = setup.module, setup.probe, setup.output_dir
    chance = module.chance_metrics(setup.datamodule)
    log.info("%s probe of a %s encoder on %s", probe.name, cfg.encoder.size, cfg.task.name)
    result, facts = probe_encoder(setup)

    main = module.main_metric
    encoder_params = sum(
        p.numel() for name, p in module.net.named_parameters() if not name.startswith("output_adapters.")
    )
    settings = {k: v for k, v in run_settings(cfg).items() if k not in _FINETUNE_ONLY}
    settings["probe"] = {"name": probe.name, **probe.settings()}
    summary = {
        "status": "finished",
        "task": cfg.task.name,
        "probe": probe.name,
        "report_column": str(cfg.probe.report_column),
        "metrics": _metrics(main, result),
        "chance": chance,
        "settings": settings,
        "pretrained_checkpoint": str(setup.source) if setup.source else None,
        "load_report": setup.report.counts() if setup.report is not None else None,
        "params_encoder": encoder_params,
        "params_trainable": result.trainable_params,
        **facts,
        "wall_time_s": round(time.perf_counter() - run_start, 3),
        "history": result.history,
    }
    path = output_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)

    value = result.final.get(main)
    print_result(f"{cfg.task.name} ({probe.name} probe)", main, result.final, chance, summary["wall_time_s"])
    run_dir = pretraining_run_dir(cfg.pretrained) if cfg.get("pretrained") else None
    if value is not None and run_dir is not None and cfg.get("write_downstream"):
        details = {
            "value": value,
            "metric": main,
            "metrics": result.final,
            "chance": chance.get(main),
            "probe": probe.name,
            "finetune_run": str(output_dir),
            "wall_time_s": summary["wall_time_s"],
        }
        column = str(cfg.probe.report_column)
        written = record_downstream(run_dir, column, value, details)
        print(f"  {column} = {value:.2f} recorded in {written}", flush=True)
    return value
