"""Rendering: ray casts a sampled scene through a pinhole camera into rgb, depth and semseg from the same hits.

Every pixel's nearest hit over all surfaces (a z-buffer) gives its depth, its class and its Lambert-shaded colour,
so the three modalities agree exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .geometry import rot_y
from .scenes import CLASS_ID, FOV_DEG, Scene, difficulty_score, sample_scene

__all__ = ["MAX_DEPTH_M", "RenderedScene", "render_scene"]

# Depth PNGs map [0, MAX_DEPTH_M] metres onto the full uint16 range.
MAX_DEPTH_M = 10.0


def _camera_rays(size: int, camera_height: float, pitch: float, yaw: float) -> tuple[np.ndarray, np.ndarray]:
    """Camera centre and one ray per pixel (row-major), scaled so that t along a ray is the z-depth in metres."""
    focal = (size / 2.0) / math.tan(math.radians(FOV_DEG) / 2.0)
    coords = (np.arange(size) + 0.5 - size / 2.0) / focal
    x_cam, y_cam = np.meshgrid(coords, -coords)  # image rows go down, camera y goes up
    # Camera axes in world space: pitched down by `pitch`, then turned by `yaw` about the vertical.
    right = np.array([1.0, 0.0, 0.0])
    up = np.array([0.0, math.cos(pitch), math.sin(pitch)])
    forward = np.array([0.0, -math.sin(pitch), math.cos(pitch)])
    dirs = x_cam.reshape(-1, 1) * right + y_cam.reshape(-1, 1) * up + forward
    return np.array([0.0, camera_height, 0.0]), dirs @ rot_y(yaw).T


@dataclass
class RenderedScene:
    """One rendered sample: rgb (H, W, 3) uint8, depth (H, W) uint16, semseg (H, W) uint8, class and factors."""

    rgb: np.ndarray
    depth: np.ndarray
    semseg: np.ndarray
    class_name: str
    factors: dict[str, Any]


def _render(scene: Scene, size: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Z-buffers every surface, then shades the nearest hit; returns (rgb float, depth m, semseg, surface ids)."""
    origin, dirs = _camera_rays(size, scene.camera_height, scene.pitch, scene.yaw)
    hits = np.stack([surface.intersect(origin, dirs) for surface in scene.surfaces])  # (S, N)
    nearest = np.argmin(hits, axis=0)
    depth = hits[nearest, np.arange(dirs.shape[0])]
    points = origin + depth[:, None] * dirs

    albedo = np.empty_like(points)
    normals = np.empty_like(points)
    for index, surface in enumerate(scene.surfaces):
        mask = nearest == index
        if mask.any():
            albedo[mask] = surface.albedo_at(points[mask])
            normals[mask] = surface.normal_at(points[mask])
    lambert = np.clip(normals @ scene.light_dir, 0.0, None)

    # Cast shadows: a lit point is in shadow when a ray towards the light hits an object.
    lit = np.flatnonzero(lambert > 0)
    shadow_origins = points[lit] + 2e-3 * normals[lit]
    shadow_dirs = np.broadcast_to(scene.light_dir, shadow_origins.shape)
    for surface in scene.surfaces:
        if surface.is_object and lit.size:
            blocked = np.isfinite(surface.intersect(shadow_origins, shadow_dirs))
            lambert[lit[blocked]] = 0.0

    shading = scene.ambient + scene.light_strength * lambert
    rgb = albedo * shading[:, None]
    rgb = rgb + rng.normal(0.0, scene.noise_std, size=rgb.shape) if scene.noise_std > 0 else rgb
    class_ids = np.array([CLASS_ID[surface.class_name] for surface in scene.surfaces], dtype=np.uint8)
    return (
        rgb.reshape(size, size, 3),
        depth.reshape(size, size),
        class_ids[nearest].reshape(size, size),
        hits,
        nearest,
    )


def render_scene(rng: np.random.Generator, *, image_size: int, max_objects: int) -> RenderedScene:
    """Samples and renders one scene.

    Args:
        rng: Source of all randomness for this sample.
        image_size: Output side in pixels.
        max_objects: Upper bound on the number of objects (each of a distinct class).

    Returns:
        The rendered modalities, the image-level class and the difficulty factors (including "difficulty").
    """
    for _attempt in range(10):
        scene = sample_scene(rng, max_objects)
        rgb, depth, semseg, hits, nearest = _render(scene, image_size, rng)
        num_planes = sum(not surface.is_object for surface in scene.surfaces)
        visible = np.bincount(nearest, minlength=len(scene.surfaces))[num_planes:]
        if visible.sum() >= 0.01 * image_size**2:
            break
    objects = scene.surfaces[num_planes:]
    # Pixels where each object is in front of the room, i.e. what it would cover if it were alone.
    background = hits[:num_planes].min(axis=0)
    unoccluded = (hits[num_planes:] < background).sum(axis=1)
    main = int(np.argmax(visible))
    factors = dict(scene.factors)
    factors.update(
        occlusion=float(1.0 - visible.sum() / max(unoccluded.sum(), 1)),
        object_coverage=float(visible.sum() / image_size**2),
        main_object_fraction=float(visible[main] / image_size**2),
    )
    factors["difficulty"] = difficulty_score(factors, max_objects)
    factors = {key: round(value, 6) if isinstance(value, float) else value for key, value in factors.items()}
    rgb8 = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    depth16 = np.rint(np.clip(depth / MAX_DEPTH_M, 0.0, 1.0) * 65535.0).astype(np.uint16)
    return RenderedScene(rgb8, depth16, semseg, objects[main].class_name, factors)
