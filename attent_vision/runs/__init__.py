"""The run layer: what ``train.py`` and ``finetune.py`` do, and what every run gets.

- ``pretrain``, ``finetune``, ``probe``: the orchestrations (compose from the config, fit or probe, summarise);
- ``kit``, ``downstream``, ``endings``, ``cli``: what they share (trainer, callbacks and loggers, resume, the
  pretrained weights a downstream run starts from, how an unfinished run ends, the command-line wrapper);
- ``stops``, ``checkpointing``, ``callbacks``, ``rng_capture``, ``loggers``: the run-level callbacks and plugins
  (graceful stop and requeue, atomic asynchronous checkpoints, summary.json, RNG-state capture, the resumable CSV
  logger).

The LightningModules themselves live in :mod:`attent_vision.lightning`.
"""
