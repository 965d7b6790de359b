"""Converts public datasets into the on-disk layouts that `MultiModalFolder` reads: one module per dataset
(`nyuv2`, `imagenet_s50`, each documenting its inputs and output layout), the checks they share (`checks`) and the
command line (`cli`).

Usage: `python -m attent_vision.data.prepare {nyuv2,imagenet_s50} --help`.
"""

from .cli import main
from .imagenet_s50 import LINK_MODES, prepare_imagenet_s50
from .nyuv2 import NYU_DEPTH_SCALE, encode_nyu_depth, prepare_nyuv2

__all__ = [
    "LINK_MODES",
    "NYU_DEPTH_SCALE",
    "encode_nyu_depth",
    "main",
    "prepare_imagenet_s50",
    "prepare_nyuv2",
]
