"""Procedural multi-modal scenes: the embedded default dataset, written in the MultiMAE folder layout.

Each scene is ray cast analytically through a pinhole camera: a floor, one or two walls and 1..N objects of
distinct classes (sphere, cube, cylinder, cone, torus, pyramid), textured, Lambert-shaded under a directional light
with cast shadows. RGB, depth and semantic labels come from the same per-pixel nearest hit, so they agree exactly.
A latent difficulty drives clutter, occlusion, texture frequency, lighting and sensor noise; the realised factors and
a scalar difficulty are written to `<split>/difficulty.json`.

Layout written under `root`:

    root/{train,val}/{rgb,depth,semseg}/<class>/<stem>.png   rgb 8-bit RGB, depth 16-bit grey, semseg 8-bit ids
    root/{train,val}/difficulty.json                           {stem: {factors..., "difficulty": float}}
    root/meta.json                                             written last; marks a complete dataset
    root/.attent/{generator.json,generate.lock}                the generator's marker and lock (`roots`)

The image-level class is the object class that covers the most pixels. Label indices follow the sorted class folder
names (ImageFolder convention); semseg ids follow `SEMSEG_CLASSES`.

Modules: `geometry` (ray-surface intersection), `scenes` (scene sampling and the difficulty score), `render` (ray
casting into the three modalities), `cache` (writing and reusing datasets), `roots` (which folder a generator may
write into, its marker and lock), `downstream` (the same scenes in the downstream datasets' formats) and `cli`
(`python -m attent_vision.data.synthetic --out DIR`).
"""

from .cache import (
    GENERATOR_VERSION,
    MODALITY_FOLDERS,
    SPLITS,
    ensure_synthetic_dataset,
    generate_split,
    generation_lock,
    load_difficulty,
)
from .cli import main
from .render import MAX_DEPTH_M, RenderedScene, render_scene
from .scenes import CLASS_ID, IMAGE_CLASSES, OBJECT_CLASSES, SEMSEG_CLASSES

__all__ = [
    "CLASS_ID",
    "GENERATOR_VERSION",
    "IMAGE_CLASSES",
    "MAX_DEPTH_M",
    "MODALITY_FOLDERS",
    "OBJECT_CLASSES",
    "SEMSEG_CLASSES",
    "SPLITS",
    "RenderedScene",
    "ensure_synthetic_dataset",
    "generate_split",
    "generation_lock",
    "load_difficulty",
    "main",
    "render_scene",
]
