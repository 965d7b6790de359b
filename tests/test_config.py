"""Every config option composes and instantiates; bad values fail at start-up naming the key."""

from pathlib import Path

import hydra
import pytest

from attent_vision.config import ConfigError, validate_pretrain_config
from tests.conftest import CONF_DIR, run_train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("model", options("model"))
def test_every_model_size_composes_and_validates(compose_cfg, model):
    cfg = compose_cfg(f"model={model}")
    validate_pretrain_config(cfg)
    assert cfg.model.net.size == model
    assert cfg.model.net.image_size == cfg.data.input_size


@pytest.mark.parametrize("group", ["trainer", "logger", "callbacks", "data", "experiment"])
def test_every_group_option_composes(compose_cfg, tmp_path, group):
    # ft_* presets belong to finetune.py (tests/test_finetune_e2e.py composes them).
    for option in [o for o in options(group) if not o.startswith("ft_")]:
        overrides = [f"{group}={option}"]
        if option == "multitask_folder" or option == "multimae_b_imagenet_s50":
            overrides.append(f"data.root={tmp_path}")
        cfg = compose_cfg(*overrides)
        assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


def test_micro_model_instantiates_from_config(compose_cfg):
    cfg = compose_cfg()
    module = hydra.utils.instantiate(cfg.model)
    assert set(module.losses) == {"rgb", "depth", "semseg", "norm_rgb"}
    assert module.num_encoded_tokens == 32
    cfg = compose_cfg("model.net.extra_norm_pix_loss=false")
    assert set(hydra.utils.instantiate(cfg.model).losses) == {"rgb", "depth", "semseg"}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.num_encoded_tokens=193", "model.num_encoded_tokens"),
        ("model.num_encoded_tokens=0", "model.num_encoded_tokens"),
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


def test_cli_reports_bad_values_without_a_traceback(tmp_path: Path):
    proc = run_train(["model.num_encoded_tokens=999"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "model.num_encoded_tokens: 999 is outside [1, 192]" in proc.stderr
    proc = run_train(["model=huge"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "Could not find 'model/huge'" in proc.stderr and "micro" in proc.stderr
    proc = run_train(["data=multitask_folder"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "data.root" in proc.stderr


def test_cfg_job_prints_the_composed_config(tmp_path: Path):
    proc = run_train(["--cfg", "job"], cwd=tmp_path)
    assert "_target_: attent_vision.tasks.pretrain.MultiMAEPretrainModule" in proc.stdout
    assert "size: micro" in proc.stdout
    assert not (tmp_path / "data").exists(), "--cfg job must not generate data"
