"""Ray-surface intersection for the synthetic scenes: a plane, a sphere, convex solids, a cylinder, a cone, a torus.

Rays are (origins, dirs) with dirs of shape (N, 3); origins are (3,) or (N, 3). Every `intersect` returns the ray
parameter t of the first hit in front of the origin (inf on a miss), in units of the given dirs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Cone",
    "ConvexSolid",
    "Cylinder",
    "Plane",
    "Sphere",
    "Surface",
    "Torus",
    "convex_solid",
    "rot_x",
    "rot_y",
]

# Smallest accepted ray parameter: hits closer than this are the surface a ray starts on.
_EPS = 1e-4


def rot_y(angle: float) -> np.ndarray:
    """Rotation by `angle` radians about the vertical (y) axis."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rot_x(angle: float) -> np.ndarray:
    """Rotation by `angle` radians about the x axis."""
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
class Surface(ABC):
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
class Plane(Surface):
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
class Sphere(Surface):
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
class ConvexSolid(Surface):
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


def convex_solid(local_normals: np.ndarray, local_offsets: np.ndarray, **kwargs: Any) -> ConvexSolid:
    """Builds a solid from half-spaces given in its local frame (centred on its base, y up)."""
    local_normals = local_normals / np.linalg.norm(local_normals, axis=1, keepdims=True)
    normals = local_normals @ kwargs["rotation"].T
    offsets = local_offsets / np.linalg.norm(local_normals, axis=1) + normals @ kwargs["center"]
    return ConvexSolid(normals=normals, offsets=offsets, **kwargs)


@dataclass
class Cylinder(Surface):
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
class Cone(Surface):
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
class Torus(Surface):
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
