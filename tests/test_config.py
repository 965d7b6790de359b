"""Every config option composes and instantiates; bad values fail at start-up naming the key."""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from attent_vision.config import ConfigError, validate_pretrain_config
from attent_vision.runs.callbacks import SpawnedProcessGroupCleanup, ValidateLastEpoch, run_callbacks
from attent_vision.runs.kit import build_trainer, instantiate_group
from attent_vision.runs.pretrain import build_teacher
from attent_vision.runs.rng_capture import RngStateCapture
from attent_vision.runs.summary import FinetuneSummary, PretrainSummary
from tests.conftest import CONF_DIR, PRIMARY_CONFIG_DIRS, TINY_OVERRIDES, read_summary, run_train

SCRIPT_DIRS = {"train": PRIMARY_CONFIG_DIRS["train"], "finetune": PRIMARY_CONFIG_DIRS["finetune"]}
SHARED_DIR = CONF_DIR / "shared"


def options(group: str, script: str = "train") -> list[str]:
    """The options of ``group`` as ``script`` sees them: its own folder's and the shared folder's."""
    folders = (SCRIPT_DIRS[script] / group, SHARED_DIR / group)
    return sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})


def groups(script: str) -> list[str]:
    """The config groups of ``<script>.yaml``'s defaults list, with their nested groups (``hydra/launcher``)."""
    names = []
    for entry in OmegaConf.load(SCRIPT_DIRS[script] / f"{script}.yaml").defaults:
        if isinstance(entry, str):  # _self_
            continue
        (key,) = entry.keys()
        group = key.removeprefix("optional ").removeprefix("override ").strip()
        names.append(group)
        for folder in (SCRIPT_DIRS[script] / group, SHARED_DIR / group):
            names += (
                [f"{group}/{d.name}" for d in sorted(folder.iterdir()) if d.is_dir()]
                if folder.is_dir()
                else []
            )
    return list(dict.fromkeys(names))


def every_option() -> Iterator[Any]:
    for script in ("train", "finetune"):
        for group in groups(script):
            for option in options(group, script):
                yield pytest.param(script, group, option, id=f"{script}-{group}={option}")


def target_paths(node: Any, path: str = "") -> Iterator[str]:
    """Where the config has a ``_target_`` node (interpolations are counted where they point)."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path
        keys = [k for k in node if not OmegaConf.is_interpolation(node, k)]
        children = [(f"{path}.{k}" if path else str(k), node[k]) for k in keys]
    elif isinstance(node, ListConfig):
        children = [
            (f"{path}[{i}]", node[i]) for i in range(len(node)) if not OmegaConf.is_interpolation(node, i)
        ]
    else:
        return
    for child_path, child in children:
        yield from target_paths(child, child_path)


# What train.py (attent_vision.runs.pretrain) and finetune.py (attent_vision.runs.finetune) instantiate; selection, scoring,
# ratio and interval are built inside the teacher (teacher.selector: ${selection}, ...).
BUILT = {
    "train": {
        "teacher",
        "selection",
        "scoring",
        "ratio",
        "interval",
        "data",
        "model",
        "callbacks",
        "logger",
        "trainer",
    },
    "finetune": {"data", "module", "probe", "callbacks", "logger", "trainer"},
}


@pytest.mark.parametrize("model", options("model"))
def test_every_model_size_composes_and_validates(compose_cfg, model):
    cfg = compose_cfg(f"model={model}")
    validate_pretrain_config(cfg)
    assert cfg.model.net.size == model
    assert cfg.model.net.image_size == cfg.data.input_size


def for_this_machine(cfg: DictConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets the Trainer of a GPU or cluster preset be built here: on the CPU when the GPUs are missing, and inside a
    simulated SLURM job (rank 0 of the tasks the preset submits, counts Lightning checks against devices and nodes).
    """
    devices = cfg.trainer.get("devices", 1)
    needed = devices if isinstance(devices, int) and devices > 0 else 1
    if cfg.trainer.accelerator in ("gpu", "cuda") and torch.cuda.device_count() < needed:
        with open_dict(cfg):
            cfg.trainer.accelerator = "cpu"
    if any("SLURMEnvironment" in str(p.get("_target_")) for p in cfg.trainer.get("plugins") or []):
        launcher = cfg.hydra.launcher
        job = {
            "SLURM_NTASKS": launcher.tasks_per_node * launcher.nodes,
            "SLURM_NTASKS_PER_NODE": launcher.tasks_per_node,
            "SLURM_NNODES": launcher.nodes,
            "SLURM_PROCID": 0,
            "SLURM_LOCALID": 0,
            "SLURM_NODEID": 0,
            "SLURM_JOB_ID": 1,
            "SLURM_JOB_NAME": "config_test",
            "SLURM_NODELIST": "localhost",
            "MASTER_ADDR": "127.0.0.1",  # set here, so that whatever Lightning writes to them is undone
            "MASTER_PORT": 12910,
        }
        for name, value in job.items():
            monkeypatch.setenv(name, str(value))


@pytest.mark.filterwarnings("ignore:The `srun` command is available")
@pytest.mark.parametrize(("script", "group", "option"), list(every_option()))
@pytest.mark.slow
def test_every_group_option_composes_and_instantiates(
    compose_cfg, compose_finetune, tmp_path, monkeypatch, script, group, option
):
    """Each option of each group of train.py and finetune.py, composed as the CLI would (``@package _global_``
    options bring their own overrides: selection=infobatch picks scoring=online), builds as its script builds it.

    Models are built on the meta device (every constructor argument is checked, no 300 M parameters allocated);
    W&B stays offline (the logger is built, no run is started).
    """
    monkeypatch.setenv("WANDB_MODE", "offline")
    compose = {"train": compose_cfg, "finetune": compose_finetune}[script]
    override = f"{group}={option}"
    cfg = compose(override)
    missing = [
        m for k in cfg if k != "hydra" and OmegaConf.is_config(cfg[k]) for m in OmegaConf.missing_keys(cfg[k])
    ]
    if missing:  # the real-dataset presets ask for data.root (`???`), as the CLI does
        assert missing == ["data.root"], missing
        cfg = compose(override, f"data.root={tmp_path / 'dataset'}")
    if (group, option) == ("selection", "infobatch"):
        assert cfg.scoring.mode == "online"
    # Every _target_ node is one that the script builds (Hydra builds its own; the launcher is built below).
    app = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    unbuilt = [p for p in target_paths(app) if p.split(".")[0] not in BUILT[script]]
    assert not unbuilt, f"{override}: _target_ nodes that {script}.py does not build: {unbuilt}"

    last: list[Any] = []
    with torch.device("meta"):
        hydra.utils.instantiate(cfg.model if script == "train" else cfg.module, _convert_="all")
    if script == "train":
        last = [build_teacher(cfg)]  # the selector, scorer and schedules inside it
    elif cfg.get("probe") is not None:
        hydra.utils.instantiate(cfg.probe.method, _convert_="all")  # as run_probe builds it
    hydra.utils.instantiate(cfg.data, _convert_="all")
    callbacks, summary = run_callbacks(
        instantiate_group(cfg.get("callbacks")),
        PretrainSummary if script == "train" else FinetuneSummary,
        output_dir=str(cfg.paths.output_dir),
        last=last,
    )
    loggers = instantiate_group(cfg.get("logger"))
    for_this_machine(cfg, monkeypatch)
    trainer = build_trainer(cfg, callbacks, loggers)
    assert [cb for cb in trainer.callbacks if isinstance(cb, PretrainSummary | FinetuneSummary)] == [summary]
    assert sum(isinstance(cb, SpawnedProcessGroupCleanup) for cb in trainer.callbacks) == 1
    assert all(cb in trainer.callbacks for cb in last)
    launcher = cfg.hydra.launcher
    if not str(launcher._target_).startswith(
        "hydra._internal."
    ):  # submitit's, from cluster= or hydra/launcher=
        hydra.utils.instantiate(launcher)
    wandb = sys.modules.get("wandb")
    assert wandb is None or wandb.run is None, "building the config must not start a W&B run"


def test_run_summary_is_added_once_whatever_the_callbacks_group(compose_cfg):
    for overrides in [
        ["callbacks=none"],
        ["~callbacks"],
        # a config written when the summary was still listed in conf/callbacks: used, not doubled
        [
            "+callbacks.run_summary._target_=attent_vision.runs.summary.PretrainSummary",
            "+callbacks.run_summary.output_dir=${paths.output_dir}",
            "+callbacks.cleanup._target_=attent_vision.runs.callbacks.SpawnedProcessGroupCleanup",
        ],
    ]:
        cfg = compose_cfg(*overrides)
        teacher = build_teacher(cfg)
        callbacks, summary = run_callbacks(
            instantiate_group(cfg.get("callbacks")),
            PretrainSummary,
            output_dir=str(cfg.paths.output_dir),
            last=[teacher],
        )
        assert [cb for cb in callbacks if isinstance(cb, PretrainSummary)] == [summary], overrides
        assert summary.path == Path(cfg.paths.output_dir) / "summary.json"
        assert sum(isinstance(cb, SpawnedProcessGroupCleanup) for cb in callbacks) == 1
        # the summary first (its epoch times close before the pictures draw), the teacher after the configured ones
        assert callbacks[0] is summary and callbacks[-4] is teacher
        assert sum(isinstance(cb, RngStateCapture) for cb in callbacks) == 1
        assert isinstance(callbacks[-1], SpawnedProcessGroupCleanup)
    callbacks, summary = run_callbacks(
        [PretrainSummary(output_dir="a"), FinetuneSummary(output_dir="b")], FinetuneSummary, output_dir="c"
    )
    assert [type(cb) for cb in callbacks] == [
        FinetuneSummary,
        ValidateLastEpoch,
        RngStateCapture,
        SpawnedProcessGroupCleanup,
    ]
    assert summary.path == Path("b", "summary.json")


def test_micro_model_instantiates_from_config(compose_cfg):
    cfg = compose_cfg()
    module = hydra.utils.instantiate(cfg.model)
    assert set(module.losses) == {"rgb", "depth", "semseg", "norm_rgb"}
    assert module.net.masking.num_encoded_tokens == 32
    cfg = compose_cfg("model.net.extra_norm_pix_loss=false")
    assert set(hydra.utils.instantiate(cfg.model).losses) == {"rgb", "depth", "semseg"}


def test_pretraining_validates_every_20th_epoch_finetuning_every_epoch(compose_cfg, compose_finetune):
    pretrain = compose_cfg("trainer=default")
    assert pretrain.trainer.check_val_every_n_epoch == 20
    assert pretrain.callbacks.model_checkpoint.save_on_train_epoch_end is True
    assert compose_finetune().trainer.check_val_every_n_epoch == 1
    assert compose_finetune("experiment=ft_nyuv2_semseg").trainer.check_val_every_n_epoch == 20


def test_default_optimizer_is_fused_adamw_with_the_loop_update(compose_cfg):
    """The fused AdamW kernel (the default since it is 2-5x faster on CPU) makes the same update as torch's
    per-parameter loop on the model's own parameter groups (decay and no-decay)."""
    cfg = compose_cfg()
    factory = hydra.utils.instantiate(cfg.model.optimizer)
    assert factory.func is torch.optim.AdamW and factory.keywords["fused"] is True
    torch.manual_seed(0)
    nets = [hydra.utils.instantiate(cfg.model).net for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    groups = [
        [
            {"params": [p for p in n.parameters() if p.ndim > 1]},
            {"params": [p for p in n.parameters() if p.ndim <= 1], "weight_decay": 0.0},
        ]
        for n in nets
    ]
    fused = factory(groups[0], lr=1e-3, weight_decay=0.05)
    loop = torch.optim.AdamW(
        groups[1], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, foreach=False
    )
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    before = [p.detach().clone() for p in nets[0].parameters()]
    for _ in range(3):
        for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(p, b) for p, b in zip(nets[0].parameters(), before, strict=True))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.net.masking.num_encoded_tokens=193", "model.net.masking.num_encoded_tokens"),
        ("model.net.masking.num_encoded_tokens=0", "model.net.masking.num_encoded_tokens"),
        ("model.net.patch_size=7", "model.net.patch_size"),
        ("data.modalities=[rgb,normals]", "data.modalities"),
        ("data.crop_scale=[0.5,0.2]", "data.crop_scale"),
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
    ],
)
def test_invalid_values_name_the_key(compose_cfg, override, key):
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_pretrain_config(cfg)


def test_missing_dataset_path_names_the_key(compose_cfg, tmp_path):
    cfg = compose_cfg("data=multitask_folder", f"data.root={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match=r"data\.root: .*nowhere is not a directory"):
        validate_pretrain_config(cfg)
    (tmp_path / "ds" / "train" / "rgb").mkdir(parents=True)
    (tmp_path / "ds" / "val").mkdir(parents=True)
    cfg = compose_cfg("data=multitask_folder", f"data.root={tmp_path / 'ds'}")
    with pytest.raises(ConfigError, match=r"data\.modalities: .*no folder for \['depth', 'semseg'\]"):
        validate_pretrain_config(cfg)


def test_bad_values_and_unknown_options_name_the_key_and_the_choices(compose_cfg):
    """What train.py reports for them (one message, no traceback: tests/test_cli_attent.py runs the CLI path)."""
    with pytest.raises(
        ConfigError, match=r"model\.net\.masking\.num_encoded_tokens: 999 is outside \[1, 192\]"
    ):
        validate_pretrain_config(compose_cfg("model.net.masking.num_encoded_tokens=999"))
    with pytest.raises(MissingConfigException, match=r"Could not find 'model/huge'") as error:
        compose_cfg("model=huge")
    assert "micro" in str(error.value)  # the available options are listed
    with pytest.raises(ConfigError, match=r"data\.root"):
        validate_pretrain_config(compose_cfg("data=multitask_folder"))


@pytest.mark.slow
def test_cfg_job_prints_the_composed_config(tmp_path: Path):
    proc = run_train(["--cfg", "job"], cwd=tmp_path)
    assert "_target_: attent_vision.lightning.pretrain.MultiMAEPretrainModule" in proc.stdout
    assert "size: micro" in proc.stdout
    assert not (tmp_path / "data").exists(), "--cfg job must not generate data"


@pytest.mark.slow
def test_callbacks_none_still_writes_the_summary(tmp_path: Path):
    """summary.json does not depend on the callbacks group: the report and resume accounting read it."""
    proc = run_train([*TINY_OVERRIDES, "callbacks=none", "hydra.run.dir=outputs/bare"], cwd=tmp_path)
    summary = read_summary(tmp_path / "outputs" / "bare")
    assert summary["status"] == "finished" and summary["optimizer_steps"] == 12
    assert len(summary["sessions"]) == 1 and summary["initial_val_loss"] > 0
    assert "run summary (summary.json):" in proc.stdout


def test_trainer_default_picks_bf16_on_gpus_and_native_bf16_cpus_else_fp32(compose_cfg):
    from attent_vision.config import auto_precision

    amx = "flags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n"
    avx2 = "flags\t\t: fpu sse avx2 fma\n"
    assert auto_precision(cuda=False, cpuinfo=amx) == "bf16-mixed"
    assert auto_precision(cuda=False, cpuinfo="Features\t: fp asimd bf16\n") == "bf16-mixed"  # Arm
    assert auto_precision(cuda=False, cpuinfo=avx2) == "32-true"
    assert auto_precision(cuda=True, cpuinfo=avx2) == "bf16-mixed"  # GPUs unchanged
    # The config asks this machine (trainer=default); trainer=cpu (the smoke preset) stays 32-bit everywhere.
    assert compose_cfg().trainer.precision == auto_precision()
    assert compose_cfg("trainer=cpu").trainer.precision == "32-true"


def test_native_bf16_is_read_from_the_cpu_flags():
    from attent_vision.config import cpu_has_native_bf16

    assert cpu_has_native_bf16("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16("Features\t: fp asimd bf16 i8mm\n")  # Arm
    assert cpu_has_native_bf16("flags\t\t: avx2 amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16(
        "flags\t\t: fpu sse avx2 avx512f avx512bw\n"
    )  # AVX2/AVX-512 only: emulated
    assert not cpu_has_native_bf16("model name\t: bf16 in a name is not a flag\n")


@pytest.mark.parametrize(
    ("script", "own", "foreign"),
    [
        (
            "train",
            ["model:", "selection:", "ratio:", "scoring:"],
            ["task:", "encoder:", "probe:", "_multimae"],
        ),
        ("finetune", ["task:", "encoder:", "probe:"], ["model:", "selection:", "ratio:", "_multimae"]),
    ],
)
@pytest.mark.slow
def test_help_lists_only_its_own_groups_and_the_shared_ones(script, own, foreign) -> None:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / f"{script}.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    groups = proc.stdout.split("== Config ==")[0]
    for name in [*own, "trainer: cpu, ddp, ddp_cpu, default, gpu", "logger:", "cluster:"]:
        assert f"\n{name}" in groups, (script, name)
    for name in foreign:
        assert name not in groups, (script, name)


def test_the_shared_groups_written_into_help_are_the_shared_folders() -> None:
    shared = CONF_DIR / "shared"
    for script in ("train", "finetune"):
        raw = OmegaConf.load(SCRIPT_DIRS[script] / "hydra" / "default.yaml")
        template = OmegaConf.to_container(raw, resolve=False)["help"]["template"]
        for group in ("callbacks", "cluster", "hydra/launcher", "logger", "paths", "trainer"):
            listed = sorted(p.stem for p in (shared / group).glob("*.yaml"))
            assert f"{group}: {', '.join(listed)}" in template, (script, group)


def test_a_fine_tuning_experiment_is_not_an_option_of_train_py(compose_cfg, compose_finetune) -> None:
    with pytest.raises(MissingConfigException, match=r"experiment/ft_nyuv2_depth(.|\n)*smoke"):
        compose_cfg("experiment=ft_nyuv2_depth")
    with pytest.raises(MissingConfigException, match="experiment/smoke"):
        compose_finetune("experiment=smoke")
