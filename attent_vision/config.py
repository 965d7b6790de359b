"""Hydra resolvers and start-up validation of the composed config.

Every check here runs before any data is generated or any model is built, so a bad value fails in the first
second with a message that names the config key, the value and what was expected.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from attent_vision.data.modalities import MODALITIES, output_tasks

CONF_ROOT = Path(__file__).resolve().parent / "conf"
# The folder of each entry point's primary config (its own groups); the shared groups come from CONF_ROOT / "shared"
# through the primary config's hydra.searchpath.
PRIMARY_CONFIG_DIRS: dict[str, Path] = {"train": CONF_ROOT / "pretrain", "finetune": CONF_ROOT / "finetune"}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


# CPU features that run bf16 matrix products natively: AVX512-BF16 or AMX (x86), the BF16 extension (Arm).
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes in bf16 natively (from /proc/cpuinfo's flags; False where it cannot be read).

    Without it bf16 autocast is emulated with conversions and runs slower than fp32.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and _NATIVE_BF16_FLAGS & set(value.split()):
            return True
    return False


def auto_precision(*, cuda: bool | None = None, cpuinfo: str | None = None) -> str:
    """``trainer=default``'s precision: bf16 autocast on GPUs and on CPUs that compute bf16 natively, else fp32.

    On a CPU with AMX (2 cores, torch 2.14.1) the default run took 161 s in bf16-mixed against 195 s in fp32 and
    ended at the same validation loss (2.2012 vs 2.2019) and fine-tuned mIoU (81.96 vs 81.97); without native
    support bf16 autocast is emulated and about 12x slower than fp32 (docs/benchmarks.md, section 8).

    Args:
        cuda: Whether a GPU is present; None asks torch.
        cpuinfo: ``/proc/cpuinfo``'s text; None reads it.
    """
    if torch.cuda.is_available() if cuda is None else cuda:
        return "bf16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16(cpuinfo) else "32-true"


def _token_fraction(modalities: list[str], input_size: int, patch_size: int, denominator: int) -> int:
    # MultiMAE encodes 1/6 of the tokens (98 of 588 at 224 px / patch 16); keep that share at any size.
    total = count_input_tokens(
        modalities=list(modalities), input_size=int(input_size), patch_size=int(patch_size)
    )
    return max(1, total // int(denominator))


def _short_dirname(name: str, limit: int = 200) -> str:
    # A sweep job's directory is named after its overrides: a path value must not nest it in subfolders, and long
    # lists would exceed the 255-byte name limit.
    name = name.replace("/", "%")
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9]}-{digest}"


def _process_start(pid: int) -> datetime | None:
    # Linux: field 22 of /proc/<pid>/stat is the start in clock ticks after boot (btime in /proc/stat).
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return datetime.fromtimestamp(boot + int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _launch_stamp(pattern: str) -> str:
    # torchrun starts every rank as its own process, and each composes its own config: a stamp read from each
    # rank's clock can differ by a second and split one run into two directories. The launcher's start time is
    # the same for every rank of the node; across nodes, the rendezvous id (--rdzv-id) is.
    if "TORCHELASTIC_RUN_ID" in os.environ:
        run_id = os.environ["TORCHELASTIC_RUN_ID"]
        if os.environ.get("WORLD_SIZE") != os.environ.get("LOCAL_WORLD_SIZE") and run_id != "none":
            return f"torchrun_{run_id}"
        started = _process_start(os.getppid())
        if started is not None:
            return started.strftime(pattern)
    return datetime.now().strftime(pattern)


def _run_stamp(pattern: str) -> str:
    # A SLURM job keeps its id when it is requeued, so its run directory must not depend on the start time.
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm_{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm_{os.environ['SLURM_JOB_ID']}"
    return _launch_stamp(pattern)


def _log_suffix() -> str:
    # Every DDP process configures Hydra's file log; only the first writes <task>.log, the others <task>.rankN.log.
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "0") not in ("", "0"):
            if var == "SLURM_PROCID" and os.environ.get("SLURM_NTASKS", "1") == "1":
                continue
            return f".rank{os.environ[var]}"
    return ""


def register_resolvers() -> None:
    """Register the project's OmegaConf resolvers (idempotent)."""
    if not OmegaConf.has_resolver("auto_precision"):
        OmegaConf.register_new_resolver("auto_precision", auto_precision)
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", _run_stamp, use_cache=True)
    if not OmegaConf.has_resolver("launch_stamp"):
        OmegaConf.register_new_resolver("launch_stamp", _launch_stamp, use_cache=True)
    if not OmegaConf.has_resolver("log_suffix"):
        OmegaConf.register_new_resolver("log_suffix", _log_suffix)
    if not OmegaConf.has_resolver("short_dirname"):
        OmegaConf.register_new_resolver("short_dirname", _short_dirname)
    if not OmegaConf.has_resolver("launch_dir"):
        OmegaConf.register_new_resolver("launch_dir", os.getcwd)
    if not OmegaConf.has_resolver("token_fraction"):
        OmegaConf.register_new_resolver("token_fraction", _token_fraction)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def require_set_values(cfg: DictConfig) -> None:
    """Names every mandatory value (``???``) left unset, instead of OmegaConf's error from wherever it is read."""
    missing = []
    for key in cfg:
        if key == "hydra":  # Hydra's own node (its sweep keys stay unset outside a multirun)
            continue
        if OmegaConf.is_missing(cfg, key):
            missing.append(str(key))
        elif OmegaConf.is_config(node := cfg[key]):
            missing += OmegaConf.missing_keys(node)  # full keys ("data.root")
    missing.sort()
    if missing:
        raise ConfigError(
            f"{', '.join(missing)}: required but not set; give {'it' if len(missing) == 1 else 'them'} on the "
            f"command line, e.g. {missing[0]}=..."
        )


def count_input_tokens(*, modalities: list[str], input_size: int, patch_size: int) -> int:
    """Tokens the encoder would see unmasked: every modality gives (input_size / patch_size)^2 patches."""
    return len(modalities) * (input_size // patch_size) ** 2


def validate_pretrain_config(cfg: DictConfig) -> None:
    """Fail fast on values that would otherwise crash deep inside training or silently misbehave."""
    require_set_values(cfg)
    data, model = cfg.data, cfg.model
    modalities = list(data.modalities)
    known = set(MODALITIES)
    _require(len(modalities) > 0, "data.modalities", "needs at least one modality")
    unknown = sorted(set(modalities) - known)
    _require(not unknown, "data.modalities", f"unknown modalities {unknown}; allowed: {sorted(known)}")
    _require(len(set(modalities)) == len(modalities), "data.modalities", f"duplicates in {modalities}")

    input_size, patch_size = int(data.input_size), int(model.net.patch_size)
    _require(input_size > 0, "data.input_size", f"must be positive, got {input_size}")
    _require(
        patch_size > 0 and input_size % patch_size == 0,
        "model.net.patch_size",
        f"{patch_size} must divide data.input_size={input_size}",
    )
    stride = int(data.semseg_stride)
    _require(
        stride > 0 and patch_size % stride == 0 and input_size % stride == 0,
        "data.semseg_stride",
        f"{stride} must divide model.net.patch_size={patch_size} and data.input_size={input_size}",
    )
    num_tokens = count_input_tokens(modalities=modalities, input_size=input_size, patch_size=patch_size)
    net = int(model.net.masking.num_encoded_tokens)
    _require(
        1 <= net <= num_tokens,
        "model.net.masking.num_encoded_tokens",
        f"{net} is outside [1, {num_tokens}]: {len(modalities)} modalities x "
        f"({input_size}/{patch_size})^2 patches = {num_tokens} tokens",
    )
    _require(int(data.batch_size) > 0, "data.batch_size", f"must be positive, got {data.batch_size}")
    _require(int(data.num_workers) >= 0, "data.num_workers", f"must be >= 0, got {data.num_workers}")
    _require(float(model.blr) > 0, "model.blr", f"must be positive, got {model.blr}")
    _require(float(model.min_lr) >= 0, "model.min_lr", f"must be >= 0, got {model.min_lr}")
    _require(
        int(cfg.trainer.max_epochs) >= 1, "trainer.max_epochs", f"must be >= 1, got {cfg.trainer.max_epochs}"
    )
    lo, hi = (float(v) for v in data.crop_scale)
    _require(0 < lo <= hi <= 1, "data.crop_scale", f"needs 0 < min <= max <= 1, got {[lo, hi]}")
    scored = (cfg.get("scoring") or {}).get("tasks")
    if scored is not None:  # the scorer only meets the model at the first scoring pass, an epoch in
        outputs = output_tasks(modalities, norm_pix=bool(model.net.get("extra_norm_pix_loss")))
        unknown = [str(t) for t in scored if t not in outputs]
        _require(not unknown, "scoring.tasks", f"{unknown} are not output tasks; allowed: {outputs}")

    if data.get("synthetic") is None:
        root = Path(str(data.root))
        _require(root.is_dir(), "data.root", f"{root} is not a directory")
        for split_key in ("train_dir", "val_dir"):
            split = root / str(data[split_key])
            _require(split.is_dir(), f"data.{split_key}", f"{split} does not exist")
            missing = [m for m in modalities if not (split / m).is_dir()]
            _require(not missing, "data.modalities", f"{split} has no folder for {missing}")

    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and ckpt != "last":
        _require(Path(str(ckpt)).is_file(), "ckpt_path", f"{ckpt} is not a file")


FINETUNE_TASKS = ("cls", "semseg", "depth")
PROBES = ("knn", "linear")


def validate_probe_config(cfg: DictConfig) -> None:
    """``probe=knn|linear``: the probe fits the task, and no fine-tuning-only option is set with it."""
    probe, task = cfg.probe, cfg.task.name
    name = probe.get("name")
    _require(name in PROBES, "probe", f"{name!r} is not one of {['none', *PROBES]}")
    _require(
        name != "knn" or task == "cls",
        "probe",
        f"probe=knn votes over class labels and needs task=cls (got task={task}); use probe=linear for {task}",
    )
    _require(
        not cfg.get("eval_only"),
        "probe",
        f"probe={name} trains no model to evaluate later: drop eval_only=true (the probe evaluates as it runs)",
    )
    _require(
        cfg.get("ckpt_path") is None,
        "probe",
        f"probe={name} neither resumes nor evaluates a fine-tuning checkpoint: drop ckpt_path and give the "
        "encoder with pretrained=<run dir or checkpoint>",
    )
    _require(bool(str(probe.get("report_column") or "")), "probe.report_column", "must name a column")
    method = probe.method
    if name == "knn":
        _require(int(method.k) >= 1, "probe.method.k", f"must be >= 1, got {method.k}")
        _require(
            float(method.temperature) > 0,
            "probe.method.temperature",
            f"must be > 0, got {method.temperature}",
        )
    else:
        for key in ("epochs", "batch_size", "eval_every"):
            _require(int(method[key]) >= 1, f"probe.method.{key}", f"must be >= 1, got {method[key]}")
        _require(float(method.blr) > 0, "probe.method.blr", f"must be > 0, got {method.blr}")


def validate_finetune_config(cfg: DictConfig) -> None:
    """Fail fast on fine-tuning values that would otherwise crash deep inside training."""
    require_set_values(cfg)
    task, data, module = cfg.task, cfg.data, cfg.module
    _require(task.name in FINETUNE_TASKS, "task", f"{task.name!r} is not one of {list(FINETUNE_TASKS)}")
    if cfg.get("probe") is not None:
        validate_probe_config(cfg)
    inputs = list(module.net.in_domains)
    allowed = ["rgb"] if task.name == "cls" else ["rgb", "depth"] if task.name == "semseg" else ["rgb"]
    _require(
        bool(inputs) and set(inputs) <= set(allowed) and len(set(inputs)) == len(inputs),
        "module.net.in_domains",
        f"{inputs} is not a valid input for task={task.name}; allowed: {allowed}",
    )
    input_size, patch_size = int(data.input_size), int(cfg.encoder.patch_size)
    _require(
        input_size > 0 and input_size % patch_size == 0,
        "data.input_size",
        f"{input_size} must be a positive multiple of encoder.patch_size={patch_size}",
    )
    _require(int(data.batch_size) > 0, "data.batch_size", f"must be positive, got {data.batch_size}")
    _require(int(data.num_workers) >= 0, "data.num_workers", f"must be >= 0, got {data.num_workers}")
    _require(int(data.num_classes) >= 2, "data.num_classes", f"must be >= 2, got {data.num_classes}")
    _require(
        int(cfg.trainer.max_epochs) >= 1, "trainer.max_epochs", f"must be >= 1, got {cfg.trainer.max_epochs}"
    )
    lr, blr = module.get("lr"), module.get("blr")
    _require(
        (lr is not None and float(lr) > 0) or (lr is None and blr is not None and float(blr) > 0),
        "module.lr",
        f"needs a positive module.lr, or module.lr=null with a positive module.blr (got lr={lr}, blr={blr})",
    )
    decay = module.get("layer_decay")
    _require(
        decay is None or 0 < float(decay) <= 1,
        "module.layer_decay",
        f"must be in (0, 1] or null, got {decay}",
    )
    if task.name == "cls" and (float(module.mixup) > 0 or float(module.cutmix) > 0):
        _require(
            int(data.batch_size) % 2 == 0,
            "data.batch_size",
            f"mixup/cutmix pairs samples, so the batch size must be even (got {data.batch_size}); "
            "or set module.mixup=0 module.cutmix=0",
        )
    if task.name == "depth":
        _require(
            0 <= float(module.min_depth) < float(module.max_depth),
            "module.max_depth",
            f"needs 0 <= module.min_depth < module.max_depth, got {module.min_depth} and {module.max_depth}",
        )
    if data.get("synthetic") is None:
        root = data.get("root")
        _require(root is not None and Path(str(root)).is_dir(), "data.root", f"{root} is not a directory")
        for key in ("train_dir", "val_dir"):
            split = Path(str(root), str(data[key]))
            _require(split.is_dir(), f"data.{key}", f"{split} does not exist")
    if cfg.get("eval_only"):
        _require(
            cfg.get("pretrained") is not None or cfg.get("ckpt_path") is not None,
            "eval_only",
            "needs pretrained=<weights> or ckpt_path=<fine-tuned checkpoint> to evaluate",
        )
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and ckpt != "last":
        _require(Path(str(ckpt)).is_file(), "ckpt_path", f"{ckpt} is not a file")


register_resolvers()
