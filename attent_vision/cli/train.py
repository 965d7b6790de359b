"""Pretrain MultiMAE: ``attent-train [group=option ...] [key=value ...]`` (see ``--help`` and ``--cfg job``)."""

import hydra
from omegaconf import DictConfig

from attent_vision.runs.cli import run_entry_point
from attent_vision.runs.pretrain import run_pretraining


@hydra.main(version_base="1.3", config_path="pkg://attent_vision.conf.pretrain", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra composes ``cfg`` from the package's config tree; the run itself lives in :mod:`attent_vision.runs`."""
    return run_entry_point(run_pretraining, cfg)


if __name__ == "__main__":
    main()
