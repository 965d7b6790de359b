"""Command line: `python -m attent_vision.data.synthetic --out DIR [options]`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __doc__ as _PACKAGE_DOC
from .cache import ensure_synthetic_dataset

__all__ = ["main"]


def main(argv: list[str] | None = None) -> Path:
    """Parses the options, generates or reuses the dataset and prints its root.

    A folder that holds other files is refused with an ``error:`` line and exit status 1; nothing is written.
    """
    parser = argparse.ArgumentParser(
        prog="python -m attent_vision.data.synthetic", description=_PACKAGE_DOC.splitlines()[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="dataset root to create or reuse")
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-val", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=80)
    parser.add_argument("--max-objects", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = ensure_synthetic_dataset(
            args.out,
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.image_size,
            max_objects=args.max_objects,
            seed=args.seed,
            num_workers=args.num_workers,
            create=True,  # --out names the folder explicitly
            root_key="--out",
        )
    except (
        ValueError
    ) as error:  # bad options, or a folder it must not write into (ConfigError, DataRootError)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(path)
    return path
