"""Constants shared by the data pipeline (values from the MultiMAE reference code, data_constants.py).

`IMAGENET_DEFAULT_MEAN` and `IMAGENET_DEFAULT_STD` are timm's (`timm.data`), written out because importing timm loads
torch, which the command-line tools of this package (`prepare`, `synthetic`) do not need; tests/test_transforms.py
checks that they equal timm's.
"""

# Depth PNGs hold uint16 values; tensors carry value / 2**16, as in the reference pretraining.
DEPTH_PNG_SCALE: int = 2**16

# NYUv2 depth PNG units per metre: the reference's 65536 / 10 encoding, so 1 unit = 10 m / 2**16 ≈ 0.15 mm.
NYU_DEPTH_SCALE: float = 65536 / 10

SEG_IGNORE_INDEX: int = 255
COCO_SEMSEG_NUM_CLASSES: int = 133

# torchvision's IMG_EXTENSIONS (torchvision.datasets.folder) without the dots, so that MultiModalFolder accepts the
# files ImageFolder does. Written out rather than imported because importing torchvision loads torch (seconds), and
# `prepare` and the readers run without it; tests/test_finetune_data.py checks that the two lists agree. MultiMAE's
# list also has "jpx" (JPEG 2000), left out because Pillow reads it only when built with OpenJPEG.
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp")

IMAGENET_DEFAULT_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
