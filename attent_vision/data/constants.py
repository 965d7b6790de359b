"""Constants shared by the data pipeline (values from the MultiMAE reference, data_constants.py)."""

IMAGENET_DEFAULT_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Depth PNGs hold uint16 values; tensors carry value / 2**16, as in the reference pretraining.
DEPTH_PNG_SCALE: int = 2**16

SEG_IGNORE_INDEX: int = 255
COCO_SEMSEG_NUM_CLASSES: int = 133

# The reference also lists "jpx" (JPEG 2000); Pillow reads JPEG 2000 only when built with OpenJPEG, so we leave it out.
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp")
