"""Converts public datasets into the on-disk layouts that `MultiModalFolder` reads.

`nyuv2` — NYU Depth V2 (labeled subset) for downstream fine-tuning. Inputs are the official files:
`nyu_depth_v2_labeled.mat` (MATLAB v7.3, i.e. HDF5, read with h5py), `splits.mat` (`trainNdxs` / `testNdxs`,
1-based) and `classMapping40.mat` (`mapClass`: 894 original ids -> 40 classes, `className`). Output:

    OUT/{train,test}/rgb/data/NNNN.png      8-bit RGB
    OUT/{train,test}/depth/data/NNNN.png    16-bit grey, round(metres * 65536 / 10) clipped to [0, 65535]; 0 = invalid
    OUT/{train,test}/semseg/data/NNNN.png   8-bit palette ('P') image whose indices are the 40-class ids, 0 = unlabeled
    OUT/meta.json                           sources, counts, class names, encodings; written last (marks completion)

NNNN is the 0-based index of the image in the labeled file, zero-padded to 4 digits; "data" is the single class
folder. Everything is validated before the first file is written.

`imagenet_s50` — the MultiMAE multi-task pretraining layout from an ImageNet-S50 image folder
(`IMAGES/<class>/<stem>.JPEG`, classes = sorted subfolders) and pseudo-label folders
(`DEPTH/<class>/<stem>.png` 16-bit, `SEMSEG/<class>/<stem>.png` 8-bit ids). Files are matched by `<class>/<stem>`,
never by sorted position (the reference's pairing bug). Output:

    OUT/<split>/rgb/<class>/<stem>.JPEG       symlink (default), hard link or copy of the source image
    OUT/<split>/depth/<class>/<stem>.png
    OUT/<split>/semseg/<class>/<stem>.png
    OUT/<split>/missing_labels.txt            one line per image left out: "<class>/<file><TAB><missing labels>"
    OUT/<split>/prepare_report.json           counts, missing labels, labels without an image, bad label files

Images lacking depth or semseg are left out, so the output pairs exactly. Symlinks are absolute and cost no space,
but break when the sources move; use `--link copy` for a self-contained tree.

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
