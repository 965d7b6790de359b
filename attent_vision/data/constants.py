"""Constants shared by the data pipeline (values from the MultiMAE reference code, data_constants.py).

`IMAGENET_DEFAULT_MEAN` and `IMAGENET_DEFAULT_STD` are timm's (`timm.data`), loaded on first access: importing timm
loads torch, which the command-line tools of this package (`prepare`, `synthetic`) do not need.
"""

from typing import Any

# Depth PNGs hold uint16 values; tensors carry value / 2**16, as in the reference pretraining.
DEPTH_PNG_SCALE: int = 2**16

SEG_IGNORE_INDEX: int = 255
COCO_SEMSEG_NUM_CLASSES: int = 133

# torchvision's IMG_EXTENSIONS (torchvision.datasets.folder) without the dots, so that MultiModalFolder accepts the
# files ImageFolder does. Written out rather than imported because importing torchvision loads torch (seconds), and
# `prepare` and the readers run without it; tests/test_finetune_data.py checks that the two lists agree. MultiMAE's
# list also has "jpx" (JPEG 2000), left out because Pillow reads it only when built with OpenJPEG.
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp")

_FROM_TIMM = ("IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD")


def __getattr__(name: str) -> Any:
    if name in _FROM_TIMM:
        import timm.data

        return getattr(timm.data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
