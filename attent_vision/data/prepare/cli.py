"""``python -m attent_vision.data.prepare``: the converters' command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..modalities import DataFormatError
from . import imagenet_s50, nyuv2
from .imagenet_s50 import LINK_MODES, prepare_imagenet_s50
from .nyuv2 import prepare_nyuv2


def _parser() -> argparse.ArgumentParser:
    """Builds the `python -m attent_vision.data.prepare` argument parser."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m attent_vision.data.prepare",
        description="Converts public datasets into the on-disk layouts that `MultiModalFolder` reads.\n\n"
        + "\n\n".join(module.__doc__.strip() for module in (nyuv2, imagenet_s50)),
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{nyuv2,imagenet_s50}")

    nyu = commands.add_parser(
        "nyuv2",
        help="NYU Depth V2 labeled set -> OUT/{train,test}/{rgb,depth,semseg}/data/NNNN.png",
        description=(
            "Converts the official NYU Depth V2 files into OUT/{train,test}/{rgb,depth,semseg}/data/NNNN.png "
            "(NNNN = 0-based index) and OUT/meta.json.\n"
            "depth: uint16 = round(metres * 65536 / 10), clipped to [0, 65535], 0 = invalid.\n"
            "semseg: palette PNG of the 40-class ids, 0 = unlabeled."
        ),
        formatter_class=formatter,
    )
    nyu.add_argument(
        "--labeled", required=True, type=Path, help="nyu_depth_v2_labeled.mat (MATLAB v7.3 / HDF5)"
    )
    nyu.add_argument(
        "--splits", required=True, type=Path, help="splits.mat with 1-based trainNdxs and testNdxs"
    )
    nyu.add_argument(
        "--mapping", required=True, type=Path, help="classMapping40.mat with mapClass and className"
    )
    nyu.add_argument("--out", required=True, type=Path, help="output root")
    nyu.add_argument(
        "--workers", type=int, default=0, help="worker processes for PNG encoding (default 0: none)"
    )
    nyu.add_argument("--overwrite", action="store_true", help="replace the output of an earlier conversion")
    nyu.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    ims = commands.add_parser(
        "imagenet_s50",
        help="ImageNet-S50 images + pseudo labels -> OUT/<split>/{rgb,depth,semseg}/<class>/<stem>.<ext>",
        description=(
            "Assembles the MultiMAE pretraining layout OUT/<split>/{rgb,depth,semseg}/<class>/<stem>.<ext>, "
            "matching images and labels by <class>/<stem>.\n"
            "Images without depth or semseg are left out and listed in OUT/<split>/missing_labels.txt; "
            "counts, labels without an image and bad label files go to OUT/<split>/prepare_report.json."
        ),
        formatter_class=formatter,
    )
    ims.add_argument("--images", required=True, type=Path, help="image folder: <class>/<stem>.JPEG")
    ims.add_argument(
        "--depth", required=True, type=Path, help="depth pseudo labels: <class>/<stem>.png (16-bit)"
    )
    ims.add_argument(
        "--semseg", required=True, type=Path, help="semseg pseudo labels: <class>/<stem>.png (8-bit ids)"
    )
    ims.add_argument("--out", required=True, type=Path, help="output root")
    ims.add_argument("--split", default="train", help="output split folder name (default: train)")
    ims.add_argument(
        "--link",
        choices=LINK_MODES,
        default="symlink",
        help="symlink (default; instant, absolute links that break if the sources move), "
        "hardlink (same filesystem only) or copy (self-contained)",
    )
    ims.add_argument(
        "--skip-bad", action="store_true", help="leave out samples with bad label files instead of failing"
    )
    ims.add_argument("--overwrite", action="store_true", help="replace the output of an earlier run")
    ims.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (1 with an `error:` line for bad inputs)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.command == "nyuv2":
            summary = prepare_nyuv2(
                args.labeled,
                args.splits,
                args.mapping,
                args.out,
                workers=args.workers,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
            counts = ", ".join(f"{split} {count}" for split, count in summary["counts"].items())
            print(f"nyuv2: wrote {counts} images to {args.out} in {summary['elapsed_s']:.2f} s")
        else:
            summary = prepare_imagenet_s50(
                args.images,
                args.depth,
                args.semseg,
                args.out,
                split=args.split,
                link=args.link,
                skip_bad=args.skip_bad,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
            counts = summary["counts"]
            print(
                f"imagenet_s50: {counts['written']} of {counts['images']} images written ({args.link}) to "
                f"{args.out / args.split}; {counts['missing_labels']} lack labels, {counts['orphan_labels']} labels "
                f"lack an image, {counts['bad_samples']} bad; {summary['elapsed_s']:.2f} s"
            )
    except (DataFormatError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
