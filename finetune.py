"""Fine-tune on a downstream task: ``python finetune.py task=cls|semseg|depth [pretrained=<run dir|ckpt|name>]``.

The same command as the installed ``attent-finetune``; this file lets a checkout run it without installing."""

from attent_vision.cli.finetune import main

if __name__ == "__main__":
    main()
