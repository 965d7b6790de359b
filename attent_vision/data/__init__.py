"""Data pipeline: modality readers (``modalities``), the multi-modal folder dataset (``folder``), joint transforms
(``transforms``), the datamodules (``datamodule`` for pretraining, ``downstream`` for fine-tuning), file checks
(``validate``), the embedded synthetic data (``synthetic``) and the converters of real datasets (``prepare``).

Import from the modules themselves: this package face imports nothing, so that the command-line tools
(``python -m attent_vision.data.prepare``, ``python -m attent_vision.data.synthetic``) start without torch.
"""
