"""The command-line entry points: ``attent-train`` / ``attent-finetune`` (console scripts of the installed wheel),
``python -m attent_vision.cli.train`` and the checkout's ``train.py`` / ``finetune.py`` all run these."""
