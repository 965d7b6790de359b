"""Fine-tune on a downstream task: ``python finetune.py task=cls|semseg|depth [pretrained=<run dir|ckpt>]``."""

import sys

import hydra
from omegaconf import DictConfig

from attent_vision.config import ConfigError
from attent_vision.data.modalities import DataFormatError
from attent_vision.run_finetune import run_finetuning


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig) -> float | None:
    try:
        return run_finetuning(cfg)
    except (ConfigError, DataFormatError) as error:
        # Bad input is the user's to fix: say what and where, without a traceback from deep inside.
        sys.exit(f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
