"""Fine-tune on a downstream task: ``attent-finetune task=cls|semseg|depth [pretrained=<run dir|ckpt|name>]``."""

import hydra
from omegaconf import DictConfig

from attent_vision.runs.cli import run_entry_point
from attent_vision.runs.finetune import run_finetuning


@hydra.main(version_base="1.3", config_path="pkg://attent_vision.conf.finetune", config_name="finetune")
def main(cfg: DictConfig) -> float | None:
    """Hydra composes ``cfg`` from the package's config tree; the run itself lives in :mod:`attent_vision.runs`."""
    return run_entry_point(run_finetuning, cfg)


if __name__ == "__main__":
    main()
