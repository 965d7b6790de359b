"""The LightningModules (MultiMAE pretraining, downstream fine-tuning), the frozen-encoder probes, their metrics,
the LR schedule and their pictures. Nothing here assembles a run: that is :mod:`attent_vision.runs`."""
