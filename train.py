"""Pretrain MultiMAE: ``python train.py [group=option ...] [key=value ...]`` (see ``--help`` and ``--cfg job``).

The same command as the installed ``attent-train``; this file lets a checkout run it without installing."""

from attent_vision.cli.train import main

if __name__ == "__main__":
    main()
