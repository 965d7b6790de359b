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

The image-level class is the object class that covers the most pixels. Label indices follow the sorted class folder
names (ImageFolder convention); semseg ids follow `SEMSEG_CLASSES`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

__all__ = [
    "GENERATOR_VERSION",
    "IMAGE_CLASSES",
    "MAX_DEPTH_M",
    "OBJECT_CLASSES",
    "SEMSEG_CLASSES",
    "RenderedScene",
    "ensure_synthetic_dataset",
    "generate_split",
    "load_difficulty",
    "render_scene",
]

log = logging.getLogger(__name__)

# Bump whenever the rendered bytes change, so that cached datasets are regenerated.
GENERATOR_VERSION = 1

SEMSEG_CLASSES: tuple[str, ...] = ("floor", "wall", "sphere", "cube", "cylinder", "cone", "torus", "pyramid")
OBJECT_CLASSES: tuple[str, ...] = SEMSEG_CLASSES[2:]
# Image-level label index = position in this sorted list, the order MultiModalFolder gives class folders.
IMAGE_CLASSES: tuple[str, ...] = tuple(sorted(OBJECT_CLASSES))
CLASS_ID = {name: i for i, name in enumerate(SEMSEG_CLASSES)}

MAX_DEPTH_M = 10.0
SPLITS = ("train", "val")
MODALITY_FOLDERS = ("rgb", "depth", "semseg")

_FOV_DEG = 60.0
_EPS = 1e-4
_CLASS_COLOURS = {
    "sphere": (0.85, 0.18, 0.16),
    "cube": (0.18, 0.34, 0.85),
    "cylinder": (0.16, 0.66, 0.28),
    "cone": (0.92, 0.80, 0.12),
    "torus": (0.70, 0.26, 0.78),
    "pyramid": (0.95, 0.52, 0.12),
}
# Size multipliers that give every class a similar projected area, so that image-level classes are roughly balanced.
_CLASS_SCALE = {"sphere": 1.03, "cube": 0.9, "cylinder": 0.9, "cone": 1.22, "torus": 1.28, "pyramid": 1.0}
# Ranges that the latent difficulty interpolates; also used to normalise the recorded factors.
_TEXTURE_FREQ = (2.0, 16.0)  # cycles per metre on object surfaces
_NOISE_STD = (0.0, 0.10)  # Gaussian sensor noise, in [0, 1] intensity units
_LIGHT_STRENGTH = (0.30, 0.85)  # directional light intensity (ambient adds 0.25..0.4)
_SEED_SPLIT_ID = {"train": 0, "val": 1}


# --------------------------------------------------------------------------------------------------------------------
# Geometry. Rays are (origins, dirs) with dirs of shape (N, 3); origins are (3,) or (N, 3). Every `intersect` returns
# the ray parameter t of the first hit in front of the origin (inf on a miss), in units of the given dirs.
# --------------------------------------------------------------------------------------------------------------------


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _nearest_positive(*candidates: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Smallest t > eps among (t, valid) candidates, inf when none is valid."""
    best = None
    for t, valid in candidates:
        t = np.where(valid & (t > _EPS), t, np.inf)
        best = t if best is None else np.minimum(best, t)
    return best


def _quadratic_roots(a: np.ndarray, half_b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Roots of a t² + 2 half_b t + c = 0 (nan where there is none)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(half_b * half_b - a * c)
        return (-half_b - root) / a, (-half_b + root) / a


@dataclass
class _Surface(ABC):
    """A renderable surface: its semantic class, albedo colour and texture; subclasses add the geometry."""

    class_name: str
    colour: np.ndarray
    center: np.ndarray
    rotation: np.ndarray  # local → world; local coords (row vectors) = (p - center) @ rotation
    texture: str = "plain"  # plain | stripes | checker | noise
    texture_freq: float = 1.0
    texture_amp: float = 0.0
    texture_axes: np.ndarray | None = None  # (3, 3) random directions and phases for stripes / noise

    is_object = True
    footprint = 0.0  # radius of the circle the surface covers on the floor

    @abstractmethod
    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Ray parameter t of the nearest hit per ray (inf where the ray misses)."""

    @abstractmethod
    def normal_at(self, points: np.ndarray) -> np.ndarray:
        """Unit surface normals at the given world points."""

    def albedo_at(self, points: np.ndarray) -> np.ndarray:
        """Colour of the surface at world points (N, 3) → (N, 3), with its texture applied."""
        if self.texture == "plain" or self.texture_amp == 0.0:
            return np.broadcast_to(self.colour, points.shape)
        local = (points - self.center) @ self.rotation
        phase = 2.0 * math.pi * self.texture_freq
        if self.texture == "checker":
            # The 0.25 offset keeps cell borders off y = 0, where the floor's rounding noise would flip cells.
            cells = np.floor(local * self.texture_freq + 0.25).sum(axis=1)
            pattern = np.mod(cells, 2.0)
        elif self.texture == "stripes":
            pattern = (np.sin(phase * (local @ self.texture_axes[0]) + self.texture_axes[1, 0]) > 0).astype(
                float
            )
        else:  # smooth band-limited noise: a sum of three plane waves in random directions
            waves = np.sin(phase * (local @ self.texture_axes.T) + self.texture_axes[:, 0] * 7.0)
            pattern = 0.5 + waves.sum(axis=1) / 6.0
        return self.colour * (1.0 - self.texture_amp * pattern)[:, None]


@dataclass
class _Plane(_Surface):
    """Infinite plane {p : normal · p = offset}, its normal pointing towards the camera side."""

    normal: np.ndarray | None = None
    offset: float = 0.0
    is_object = False

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        denom = dirs @ self.normal
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (self.offset - origins @ self.normal) / denom
        return _nearest_positive((t, denom < 0))

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.normal, points.shape)


@dataclass
class _Sphere(_Surface):
    radius: float = 1.0

    def __post_init__(self) -> None:
        self.footprint = self.radius

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        oc = origins - self.center
        a = np.einsum("ij,ij->i", dirs, dirs)
        half_b = (dirs * oc).sum(axis=-1)
        c = (oc * oc).sum(axis=-1) - self.radius**2
        t0, t1 = _quadratic_roots(a, half_b, c)
        return _nearest_positive((t0, ~np.isnan(t0)), (t1, ~np.isnan(t1)))

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        return (points - self.center) / self.radius


@dataclass
class _ConvexSolid(_Surface):
    """Intersection of half-spaces {p : n_i · p <= d_i} (boxes, pyramids); ray entry by Cyrus–Beck clipping."""

    normals: np.ndarray | None = None  # (P, 3) unit outward normals in world space
    offsets: np.ndarray | None = None  # (P,)

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        denom = dirs @ self.normals.T
        num = self.offsets - origins @ self.normals.T
        with np.errstate(divide="ignore", invalid="ignore"):
            t = num / denom
        t_enter = np.where(denom < 0, t, -np.inf).max(axis=1)
        t_exit = np.where(denom > 0, t, np.inf).min(axis=1)
        parallel_outside = ((denom == 0) & (num < 0)).any(axis=1)
        hit = (t_enter <= t_exit) & ~parallel_outside
        return _nearest_positive((t_enter, hit))

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        # The face a surface point lies on is the half-space it is closest to violating.
        face = np.argmax(points @ self.normals.T - self.offsets, axis=1)
        return self.normals[face]


def _convex_solid(local_normals: np.ndarray, local_offsets: np.ndarray, **kwargs: Any) -> _ConvexSolid:
    """Builds a solid from half-spaces given in its local frame (centred on its base, y up)."""
    local_normals = local_normals / np.linalg.norm(local_normals, axis=1, keepdims=True)
    normals = local_normals @ kwargs["rotation"].T
    offsets = local_offsets / np.linalg.norm(local_normals, axis=1) + normals @ kwargs["center"]
    return _ConvexSolid(normals=normals, offsets=offsets, **kwargs)


@dataclass
class _Cylinder(_Surface):
    """Upright cylinder standing on the floor; center is the centre of its base."""

    radius: float = 1.0
    height: float = 1.0

    def __post_init__(self) -> None:
        self.footprint = self.radius

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        o = origins - self.center
        o = np.broadcast_to(o, dirs.shape)
        a = dirs[:, 0] ** 2 + dirs[:, 2] ** 2
        half_b = o[:, 0] * dirs[:, 0] + o[:, 2] * dirs[:, 2]
        c = o[:, 0] ** 2 + o[:, 2] ** 2 - self.radius**2
        candidates = []
        for t in _quadratic_roots(a, half_b, c):
            y = o[:, 1] + t * dirs[:, 1]
            candidates.append((t, (y >= 0) & (y <= self.height)))
        with np.errstate(divide="ignore", invalid="ignore"):
            t_cap = (self.height - o[:, 1]) / dirs[:, 1]
        radial = (o[:, 0] + t_cap * dirs[:, 0]) ** 2 + (o[:, 2] + t_cap * dirs[:, 2]) ** 2
        candidates.append((t_cap, radial <= self.radius**2))
        return _nearest_positive(*candidates)

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        local = points - self.center
        side = local * np.array([1.0, 0.0, 1.0]) / self.radius
        on_cap = local[:, 1] > self.height - 1e-3
        return np.where(on_cap[:, None], np.array([0.0, 1.0, 0.0]), side)


@dataclass
class _Cone(_Surface):
    """Upright cone with its base on the floor; center is the centre of the base."""

    radius: float = 1.0
    height: float = 1.0

    def __post_init__(self) -> None:
        self.footprint = self.radius

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        # Side surface: x² + z² = (k (H - y))² with k = radius / height, for 0 <= y <= H.
        o = np.broadcast_to(origins - self.center, dirs.shape)
        k2 = (self.radius / self.height) ** 2
        top = self.height - o[:, 1]
        a = dirs[:, 0] ** 2 + dirs[:, 2] ** 2 - k2 * dirs[:, 1] ** 2
        half_b = o[:, 0] * dirs[:, 0] + o[:, 2] * dirs[:, 2] + k2 * top * dirs[:, 1]
        c = o[:, 0] ** 2 + o[:, 2] ** 2 - k2 * top**2
        candidates = []
        for t in _quadratic_roots(a, half_b, c):
            y = o[:, 1] + t * dirs[:, 1]
            candidates.append((t, (y >= 0) & (y <= self.height)))
        return _nearest_positive(*candidates)

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        local = points - self.center
        k2 = (self.radius / self.height) ** 2
        grad = np.stack([local[:, 0], k2 * (self.height - local[:, 1]), local[:, 2]], axis=1)
        return grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-9)


@dataclass
class _Torus(_Surface):
    """Torus (ring radius `major`, tube radius `minor`) around its local y axis; found by sphere tracing its SDF."""

    major: float = 1.0
    minor: float = 0.3
    steps: int = 48

    def __post_init__(self) -> None:
        self.footprint = self.major + self.minor

    def _sdf(self, local: np.ndarray) -> np.ndarray:
        ring = np.sqrt(local[:, 0] ** 2 + local[:, 2] ** 2) - self.major
        return np.sqrt(ring**2 + local[:, 1] ** 2) - self.minor

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        length = np.linalg.norm(dirs, axis=1)
        unit = dirs / length[:, None]
        # Only rays that enter the bounding sphere are traced.
        oc = np.broadcast_to(origins - self.center, dirs.shape)
        half_b = (unit * oc).sum(axis=1)
        c = (oc * oc).sum(axis=1) - (self.major + self.minor) ** 2
        t_near, t_far = _quadratic_roots(np.ones_like(half_b), half_b, c)
        rays = np.flatnonzero(~np.isnan(t_near) & (t_far > _EPS))
        result = np.full(len(dirs), np.inf)
        if rays.size == 0:
            return result
        o_local = oc[rays] @ self.rotation
        d_local = unit[rays] @ self.rotation
        t = np.maximum(t_near[rays], 0.0)
        for _ in range(self.steps):
            distance = self._sdf(o_local + t[:, None] * d_local)
            t = t + distance
        converged = (np.abs(distance) < 1e-3) & (t <= t_far[rays]) & (t > _EPS)
        result[rays[converged]] = t[converged] / length[rays[converged]]
        return result

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        local = (points - self.center) @ self.rotation
        rho = np.maximum(np.sqrt(local[:, 0] ** 2 + local[:, 2] ** 2), 1e-9)
        scale = (rho - self.major) / rho
        grad = np.stack([local[:, 0] * scale, local[:, 1], local[:, 2] * scale], axis=1)
        grad /= np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-9)
        return grad @ self.rotation.T


# --------------------------------------------------------------------------------------------------------------------
# Scene sampling
# --------------------------------------------------------------------------------------------------------------------


def _texture_params(rng: np.random.Generator, kind: str, freq: float) -> dict[str, Any]:
    axes = rng.normal(size=(3, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    return {
        "texture": kind,
        "texture_freq": freq,
        "texture_amp": float(rng.uniform(0.3, 0.6)),
        "texture_axes": axes,
    }


def _make_object(
    class_name: str,
    rng: np.random.Generator,
    position: np.ndarray,
    size: float,
    colour: np.ndarray,
    texture: dict,
) -> _Surface:
    """An object of `class_name` standing on the floor at `position` (x, 0, z) with characteristic size `size`."""
    yaw = rng.uniform(0.0, 2.0 * math.pi)
    common = {"class_name": class_name, "colour": colour, **texture}
    if class_name == "sphere":
        center = position + np.array([0.0, size, 0.0])
        return _Sphere(center=center, rotation=_rot_y(yaw), radius=size, **common)
    if class_name == "cylinder":
        radius, height = size * rng.uniform(0.6, 0.9), 2.0 * size * rng.uniform(0.8, 1.5)
        return _Cylinder(center=position, rotation=_rot_y(yaw), radius=radius, height=height, **common)
    if class_name == "cone":
        radius, height = size * rng.uniform(0.8, 1.0), 2.2 * size * rng.uniform(0.8, 1.3)
        return _Cone(center=position, rotation=_rot_y(yaw), radius=radius, height=height, **common)
    if class_name == "torus":
        tilt = rng.uniform(0.0, math.radians(75.0))
        major, minor = 0.85 * size, size * rng.uniform(0.25, 0.4)
        rotation = _rot_y(yaw) @ _rot_x(tilt)
        # Raised so that the lowest point of the tilted ring touches the floor.
        center = position + np.array([0.0, major * math.sin(tilt) + minor, 0.0])
        return _Torus(center=center, rotation=rotation, major=major, minor=minor, **common)
    rotation = _rot_y(yaw)
    if class_name == "cube":
        hx, hz = size * rng.uniform(0.75, 1.0), size * rng.uniform(0.75, 1.0)
        height = 2.0 * size * rng.uniform(0.7, 1.2)
        normals = np.array([[1, 0, 0], [-1, 0, 0], [0, 0, 1], [0, 0, -1], [0, 1, 0], [0, -1, 0]], dtype=float)
        offsets = np.array([hx, hx, hz, hz, height, 0.0])
        solid = _convex_solid(normals, offsets, center=position, rotation=rotation, **common)
        solid.footprint = math.hypot(hx, hz)
        return solid
    if class_name == "pyramid":
        half, height = size * rng.uniform(0.8, 1.0), 2.0 * size * rng.uniform(0.8, 1.3)
        # Each sloped face passes through one base edge (e · p = half at y = 0) and the apex (0, height, 0).
        sides = np.array([[1, 0, 0], [-1, 0, 0], [0, 0, 1], [0, 0, -1]], dtype=float)
        normals = np.concatenate([height * sides + np.array([0.0, half, 0.0]), [[0.0, -1.0, 0.0]]])
        offsets = np.array([half * height] * 4 + [0.0])
        solid = _convex_solid(normals, offsets, center=position, rotation=rotation, **common)
        solid.footprint = half * math.sqrt(2.0)
        return solid
    raise ValueError(f"unknown object class {class_name!r}")


@dataclass
class _Scene:
    camera_height: float
    pitch: float
    yaw: float
    surfaces: list[_Surface]
    light_dir: np.ndarray
    ambient: float
    light_strength: float
    noise_std: float
    texture_freq: float
    factors: dict[str, float]


def _jitter_colour(rng: np.random.Generator, base: tuple[float, float, float]) -> np.ndarray:
    colour = np.asarray(base) * rng.uniform(0.85, 1.1) + rng.normal(0.0, 0.05, size=3)
    return np.clip(colour, 0.03, 1.0)


def _sample_scene(rng: np.random.Generator, max_objects: int) -> _Scene:
    """Draws a latent difficulty u ~ U(0, 1) and a scene whose clutter, texture, light and noise follow it."""
    u = float(rng.uniform())

    def harder(spread: float = 0.15) -> float:
        """A noisy copy of u in [0, 1], so that factors are correlated with, but not fixed by, the difficulty."""
        return float(np.clip(u + rng.normal(0.0, spread), 0.0, 1.0))

    camera_height = rng.uniform(1.2, 1.8)
    pitch = math.radians(rng.uniform(14.0, 26.0))
    yaw = math.radians(rng.uniform(-10.0, 10.0))
    forward = np.array([math.sin(yaw), 0.0, math.cos(yaw)])
    right = np.array([math.cos(yaw), 0.0, -math.sin(yaw)])
    half_fov = math.tan(math.radians(_FOV_DEG) / 2.0)

    num_objects = 1 + int(rng.binomial(max_objects - 1, u)) if max_objects > 1 else 1
    classes = [OBJECT_CLASSES[i] for i in rng.permutation(len(OBJECT_CLASSES))[:num_objects]]
    texture_freq = _TEXTURE_FREQ[0] + (_TEXTURE_FREQ[1] - _TEXTURE_FREQ[0]) * harder()
    textured_prob = 0.2 + 0.7 * u
    in_front_prob = 0.1 + 0.7 * u  # clutter placed between the camera and the main object → occlusion

    objects: list[_Surface] = []
    placed: list[tuple[np.ndarray, float]] = []  # (floor position, footprint radius)
    main_distance = main_lateral = 0.0
    for rank, class_name in enumerate(classes):
        is_main = rank == 0
        size = rng.uniform(0.45, 0.7) if is_main else rng.uniform(0.22, 0.45) * (1.0 + 0.3 * u)
        size *= _CLASS_SCALE[class_name]
        colour = _jitter_colour(rng, _CLASS_COLOURS[class_name])
        texture = {}
        if rng.uniform() < textured_prob:
            kind = ("stripes", "checker", "noise")[int(rng.integers(3))]
            texture = _texture_params(rng, kind, texture_freq * rng.uniform(0.8, 1.2))
        for _attempt in range(20):
            if is_main:
                distance = rng.uniform(2.6, 4.2)
                lateral = rng.uniform(-0.35, 0.35) * distance * half_fov
            elif rng.uniform() < in_front_prob:
                distance = rng.uniform(1.8, max(1.9, main_distance - 0.4))
                lateral = main_lateral * distance / main_distance + rng.normal(0.0, 0.45)
            else:
                distance = rng.uniform(1.8, 6.0)
                lateral = rng.uniform(-0.8, 0.8) * distance * half_fov
            position = distance * forward + lateral * right
            obj = _make_object(class_name, rng, position, size, colour, texture)
            if all(np.linalg.norm(position - p) > obj.footprint + r + 0.05 for p, r in placed):
                break
        else:
            continue  # no free spot: the scene gets one object fewer
        if is_main:
            main_distance, main_lateral = distance, lateral
        objects.append(obj)
        placed.append((position, obj.footprint))

    # Room: floor, a back wall behind every object and, in some scenes, a side wall.
    reach = max(float(p[2]) + r for p, r in placed)
    back = min(9.5, max(6.5, reach + rng.uniform(0.5, 2.5)))
    floor_tint = rng.uniform(0.35, 0.6) * np.array([1.0, rng.uniform(0.85, 1.0), rng.uniform(0.7, 0.95)])
    floor_texture = _texture_params(rng, "checker", rng.uniform(0.8, 2.0)) if rng.uniform() < 0.5 else {}
    identity = np.eye(3)
    surfaces: list[_Surface] = [
        _Plane(
            class_name="floor",
            colour=floor_tint,
            center=np.zeros(3),
            rotation=identity,
            normal=np.array([0.0, 1.0, 0.0]),
            offset=0.0,
            **floor_texture,
        )
    ]
    wall_colour = rng.uniform(0.6, 0.85) * (1.0 + rng.normal(0.0, 0.06, size=3))
    wall_texture = _texture_params(rng, "stripes", rng.uniform(1.0, 3.0)) if rng.uniform() < 0.4 else {}
    if wall_texture:
        wall_texture["texture_axes"][0] = (1.0, 0.0, 0.0)  # vertical stripes, like wallpaper
        wall_texture["texture_amp"] *= 0.4
    surfaces.append(
        _Plane(
            class_name="wall",
            colour=wall_colour,
            center=np.zeros(3),
            rotation=identity,
            normal=np.array([0.0, 0.0, -1.0]),
            offset=-back,
            **wall_texture,
        )
    )
    if rng.uniform() < 0.6:
        side = 1.0 if rng.uniform() < 0.5 else -1.0
        extent = max([side * float(p[0]) + r for p, r in placed] + [0.0])
        x_wall = side * max(1.8, extent + rng.uniform(0.3, 1.5))
        surfaces.append(
            _Plane(
                class_name="wall",
                colour=np.clip(wall_colour * rng.uniform(0.8, 1.0), 0.0, 1.0),
                center=np.zeros(3),
                rotation=identity,
                normal=np.array([-side, 0.0, 0.0]),
                offset=-abs(x_wall),
            )
        )
    surfaces.extend(objects)

    elevation = math.radians(rng.uniform(25.0, 75.0))
    azimuth = math.radians(rng.uniform(-110.0, 110.0))  # 0 = light from behind the camera
    light_dir = np.array(
        [
            math.sin(azimuth) * math.cos(elevation),
            math.sin(elevation),
            -math.cos(azimuth) * math.cos(elevation),
        ]
    )
    light_strength = _LIGHT_STRENGTH[1] - (_LIGHT_STRENGTH[1] - _LIGHT_STRENGTH[0]) * harder()
    noise_std = _NOISE_STD[0] + (_NOISE_STD[1] - _NOISE_STD[0]) * harder(0.1) ** 1.5
    textured = sum(obj.texture != "plain" for obj in objects)
    factors = {
        "num_objects": len(objects),
        "textured_objects": textured,
        "texture_frequency": float(texture_freq),
        "noise_std": float(noise_std),
        "light_strength": float(light_strength),
        "light_elevation_deg": math.degrees(elevation),
        "light_azimuth_deg": math.degrees(azimuth),
        "latent": u,
    }
    return _Scene(
        camera_height=camera_height,
        pitch=pitch,
        yaw=yaw,
        surfaces=surfaces,
        light_dir=light_dir,
        ambient=float(rng.uniform(0.25, 0.4)),
        light_strength=float(light_strength),
        noise_std=float(noise_std),
        texture_freq=float(texture_freq),
        factors=factors,
    )


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------


def _camera_rays(size: int, camera_height: float, pitch: float, yaw: float) -> tuple[np.ndarray, np.ndarray]:
    """Camera centre and one ray per pixel (row-major), scaled so that t along a ray is the z-depth in metres."""
    focal = (size / 2.0) / math.tan(math.radians(_FOV_DEG) / 2.0)
    coords = (np.arange(size) + 0.5 - size / 2.0) / focal
    x_cam, y_cam = np.meshgrid(coords, -coords)  # image rows go down, camera y goes up
    # Camera axes in world space: pitched down by `pitch`, then turned by `yaw` about the vertical.
    right = np.array([1.0, 0.0, 0.0])
    up = np.array([0.0, math.cos(pitch), math.sin(pitch)])
    forward = np.array([0.0, -math.sin(pitch), math.cos(pitch)])
    dirs = x_cam.reshape(-1, 1) * right + y_cam.reshape(-1, 1) * up + forward
    return np.array([0.0, camera_height, 0.0]), dirs @ _rot_y(yaw).T


def _difficulty(factors: dict[str, float], max_objects: int) -> float:
    """Scalar difficulty in [0, 1]: a weighted mean of the normalised factors (weights sum to 1)."""
    clutter = (factors["num_objects"] - 1) / (max_objects - 1) if max_objects > 1 else 0.0
    occlusion = min(1.0, factors["occlusion"] / 0.5)
    texture = (factors["textured_objects"] / factors["num_objects"]) * (
        (factors["texture_frequency"] - _TEXTURE_FREQ[0]) / (_TEXTURE_FREQ[1] - _TEXTURE_FREQ[0])
    )
    noise = factors["noise_std"] / _NOISE_STD[1]
    dim = (_LIGHT_STRENGTH[1] - factors["light_strength"]) / (_LIGHT_STRENGTH[1] - _LIGHT_STRENGTH[0])
    small = float(np.clip(1.0 - factors["main_object_fraction"] / 0.25, 0.0, 1.0))
    score = 0.25 * clutter + 0.2 * occlusion + 0.15 * texture + 0.2 * noise + 0.1 * dim + 0.1 * small
    return float(np.clip(score, 0.0, 1.0))


@dataclass
class RenderedScene:
    """One rendered sample: rgb (H, W, 3) uint8, depth (H, W) uint16, semseg (H, W) uint8, class and factors."""

    rgb: np.ndarray
    depth: np.ndarray
    semseg: np.ndarray
    class_name: str
    factors: dict[str, Any]


def _render(scene: _Scene, size: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
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
        scene = _sample_scene(rng, max_objects)
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
    factors["difficulty"] = _difficulty(factors, max_objects)
    factors = {key: round(value, 6) if isinstance(value, float) else value for key, value in factors.items()}
    rgb8 = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    depth16 = np.rint(np.clip(depth / MAX_DEPTH_M, 0.0, 1.0) * 65535.0).astype(np.uint16)
    return RenderedScene(rgb8, depth16, semseg, objects[main].class_name, factors)


# --------------------------------------------------------------------------------------------------------------------
# Writing datasets
# --------------------------------------------------------------------------------------------------------------------


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Each sample has its own stream, so bytes do not depend on generation order or worker count."""
    return np.random.default_rng(np.random.SeedSequence([seed, _SEED_SPLIT_ID[split], index]))


def _write_sample(job: tuple[Path, str, int, int, int, int]) -> tuple[str, str, dict[str, Any]]:
    split_dir, split, index, seed, image_size, max_objects = job
    scene = render_scene(_sample_rng(seed, split, index), image_size=image_size, max_objects=max_objects)
    stem = f"{index:06d}"
    images = {
        "rgb": Image.fromarray(scene.rgb),
        "depth": Image.fromarray(scene.depth),  # uint16 → mode I;16 → 16-bit greyscale PNG
        "semseg": Image.fromarray(scene.semseg),
    }
    for modality, image in images.items():
        image.save(split_dir / modality / scene.class_name / f"{stem}.png", compress_level=1)
    return stem, scene.class_name, scene.factors


def generate_split(
    split_dir: str | Path,
    *,
    split: str,
    num_samples: int,
    image_size: int,
    max_objects: int,
    seed: int,
    num_workers: int = 0,
    progress: tqdm | None = None,
) -> dict[str, int]:
    """Renders one split into `split_dir` and writes its difficulty.json.

    Args:
        split_dir: Output folder (receives rgb/, depth/, semseg/ and difficulty.json).
        split: "train" or "val"; part of every sample's seed.
        num_samples: Number of images.
        image_size: Side in pixels.
        max_objects: Maximum number of objects per scene.
        seed: Dataset seed.
        num_workers: Worker processes (0 renders in this process); the output does not depend on it.
        progress: Optional progress bar advanced once per image.

    Returns:
        Number of images per image-level class.
    """
    split_dir = Path(split_dir)
    # Every class folder exists in every split, so that train and val number their classes identically.
    for modality in MODALITY_FOLDERS:
        for class_name in IMAGE_CLASSES:
            (split_dir / modality / class_name).mkdir(parents=True, exist_ok=True)
    jobs = [(split_dir, split, index, seed, image_size, max_objects) for index in range(num_samples)]
    results: Iterator[tuple[str, str, dict[str, Any]]]
    counts: Counter[str] = Counter()
    difficulty: dict[str, dict[str, Any]] = {}
    with _worker_pool(num_workers) as pool:
        results = pool.map(_write_sample, jobs, chunksize=8) if pool else map(_write_sample, jobs)
        for stem, class_name, factors in results:
            counts[class_name] += 1
            difficulty[stem] = {"class": class_name, **factors}
            if progress is not None:
                progress.update(1)
    (split_dir / "difficulty.json").write_text(json.dumps(difficulty, indent=1, sort_keys=True) + "\n")
    return {name: counts[name] for name in IMAGE_CLASSES}


@contextlib.contextmanager
def _worker_pool(num_workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """A process pool, or None when num_workers is 0."""
    if num_workers == 0:
        yield None
        return
    # fork avoids re-importing torch in every worker; rendering uses numpy and Pillow only.
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    )
    with ProcessPoolExecutor(num_workers, mp_context=context) as executor:
        yield executor


def load_difficulty(split_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Reads `<split_dir>/difficulty.json`: {stem: {factors..., "difficulty": float}}.

    The stem is the file name without extension; MultiModalFolder sample keys are "<class>/<stem>".
    """
    return json.loads((Path(split_dir) / "difficulty.json").read_text())


_META = "meta.json"
_IN_PROGRESS = ".generating"


def _count_images(split_dir: Path, modality: str) -> int:
    return sum(len(files) for _, _, files in os.walk(split_dir / modality))


def _reusable(root: Path, expected: dict[str, Any]) -> bool:
    """Whether root holds a complete dataset written with exactly these parameters and this generator version."""
    try:
        meta = json.loads((root / _META).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or any(meta.get(key) != value for key, value in expected.items()):
        return False
    if (root / _IN_PROGRESS).exists() or "counts" not in meta:
        return False
    for split in SPLITS:
        wanted = expected["params"][f"num_{split}"]
        if any(_count_images(root / split, modality) != wanted for modality in MODALITY_FOLDERS):
            return False
    return True


@contextlib.contextmanager
def generation_lock(root: str | Path) -> Iterator[None]:
    """An exclusive lock beside ``root``: processes that start together (DDP ranks, sweep jobs) generate it once."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def locked_generation(generate: Callable[..., Path]) -> Callable[..., Path]:
    """Runs a dataset generator ``generate(root, ...)`` under :func:`generation_lock`."""

    @functools.wraps(generate)
    def wrapper(root: str | Path, *args: Any, **kwargs: Any) -> Path:
        with generation_lock(root):
            return generate(root, *args, **kwargs)

    return wrapper


@locked_generation
def ensure_synthetic_dataset(
    root: str | Path,
    *,
    num_train: int = 512,
    num_val: int = 128,
    image_size: int = 80,
    max_objects: int = 6,
    seed: int = 0,
    num_workers: int = 0,
) -> Path:
    """Generates the synthetic dataset into `root` unless an identical one is already there.

    The dataset is regenerated (its old train/, val/ and meta.json deleted first) when the parameters or the
    generator version differ, or when meta.json is missing or incomplete, e.g. after an interrupted run: meta.json is
    written last. Processes that call it at once take turns (a lock file beside `root`).

    Args:
        root: Output folder; receives train/, val/ and meta.json.
        num_train: Training images.
        num_val: Validation images.
        image_size: Image side in pixels.
        max_objects: Maximum objects per scene, at most the number of object classes (each object has its own class).
        seed: Dataset seed; every sample is seeded by (seed, split, index).
        num_workers: Worker processes for generation; does not change the output.

    Returns:
        `root` as a Path.

    Raises:
        ValueError: An argument is out of range.
        FileExistsError: `root` holds train/ or val/ folders that this generator did not write.
    """
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train} and {num_val}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    if not 1 <= max_objects <= len(OBJECT_CLASSES):
        raise ValueError(
            f"max_objects must be in [1, {len(OBJECT_CLASSES)}] (one object per class), got {max_objects}"
        )
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    root = Path(root)
    params = {
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "max_objects": max_objects,
        "seed": seed,
    }
    expected = {"generator_version": GENERATOR_VERSION, "params": params}
    if _reusable(root, expected):
        log.info("Reusing synthetic dataset at %s (%d train + %d val images)", root, num_train, num_val)
        return root

    # Only ever delete what this generator wrote: its meta.json, its in-progress marker or its difficulty files.
    ours = any(
        (root / name).exists() for name in (_META, _IN_PROGRESS, *(f"{s}/difficulty.json" for s in SPLITS))
    )
    if not ours and any((root / split).exists() for split in SPLITS):
        raise FileExistsError(
            f"{root} already holds train/ or val/ without a synthetic meta.json; refusing to overwrite it. "
            "Choose an empty folder."
        )
    for split in SPLITS:
        shutil.rmtree(root / split, ignore_errors=True)
    (root / _META).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / _IN_PROGRESS).write_text(json.dumps(expected) + "\n")

    start = time.perf_counter()
    counts: dict[str, dict[str, int]] = {}
    with tqdm(total=num_train + num_val, desc="synthetic scenes", unit="img", leave=False) as progress:
        for split, num in (("train", num_train), ("val", num_val)):
            counts[split] = generate_split(
                root / split,
                split=split,
                num_samples=num,
                image_size=image_size,
                max_objects=max_objects,
                seed=seed,
                num_workers=num_workers,
                progress=progress,
            )
    meta = {
        **expected,
        "generator": "attent_vision.data.synthetic",
        "semseg_classes": list(SEMSEG_CLASSES),
        "image_classes": list(IMAGE_CLASSES),
        "max_depth_m": MAX_DEPTH_M,
        "depth_encoding": "uint16 = depth_m / max_depth_m * 65535 (z-depth along the optical axis)",
        "counts": counts,
    }
    tmp = root / f"{_META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, root / _META)
    (root / _IN_PROGRESS).unlink()
    log.info(
        "Generated synthetic dataset at %s (%d train + %d val images, %dpx) in %.1f s",
        root,
        num_train,
        num_val,
        image_size,
        time.perf_counter() - start,
    )
    return root


def main(argv: list[str] | None = None) -> Path:
    """Command line: `python -m attent_vision.data.synthetic --out DIR [options]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="dataset root to create or reuse")
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-val", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=80)
    parser.add_argument("--max-objects", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = ensure_synthetic_dataset(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
        max_objects=args.max_objects,
        seed=args.seed,
        num_workers=args.num_workers,
    )
    print(path)
    return path


if __name__ == "__main__":
    main()
