"""Scene sampling (camera, room, 1..N objects of distinct classes, light, noise) and the scalar difficulty.

A latent difficulty u ~ U(0, 1) drives clutter, occlusion, texture frequency, lighting and sensor noise;
`difficulty_score` turns the realised factors (including the occlusion the renderer measures) into one number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .geometry import Cone, Cylinder, Plane, Sphere, Surface, Torus, convex_solid, rot_x, rot_y

__all__ = [
    "CLASS_ID",
    "FOV_DEG",
    "IMAGE_CLASSES",
    "OBJECT_CLASSES",
    "SEMSEG_CLASSES",
    "Scene",
    "difficulty_score",
    "sample_scene",
]

SEMSEG_CLASSES: tuple[str, ...] = ("floor", "wall", "sphere", "cube", "cylinder", "cone", "torus", "pyramid")
OBJECT_CLASSES: tuple[str, ...] = SEMSEG_CLASSES[2:]
# Image-level label index = position in this sorted list, the order MultiModalFolder gives class folders.
IMAGE_CLASSES: tuple[str, ...] = tuple(sorted(OBJECT_CLASSES))
CLASS_ID = {name: i for i, name in enumerate(SEMSEG_CLASSES)}

FOV_DEG = 60.0  # horizontal and vertical field of view of the square pinhole camera
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
) -> Surface:
    """An object of `class_name` standing on the floor at `position` (x, 0, z) with characteristic size `size`."""
    yaw = rng.uniform(0.0, 2.0 * math.pi)
    common = {"class_name": class_name, "colour": colour, **texture}
    if class_name == "sphere":
        center = position + np.array([0.0, size, 0.0])
        return Sphere(center=center, rotation=rot_y(yaw), radius=size, **common)
    if class_name == "cylinder":
        radius, height = size * rng.uniform(0.6, 0.9), 2.0 * size * rng.uniform(0.8, 1.5)
        return Cylinder(center=position, rotation=rot_y(yaw), radius=radius, height=height, **common)
    if class_name == "cone":
        radius, height = size * rng.uniform(0.8, 1.0), 2.2 * size * rng.uniform(0.8, 1.3)
        return Cone(center=position, rotation=rot_y(yaw), radius=radius, height=height, **common)
    if class_name == "torus":
        tilt = rng.uniform(0.0, math.radians(75.0))
        major, minor = 0.85 * size, size * rng.uniform(0.25, 0.4)
        rotation = rot_y(yaw) @ rot_x(tilt)
        # Raised so that the lowest point of the tilted ring touches the floor.
        center = position + np.array([0.0, major * math.sin(tilt) + minor, 0.0])
        return Torus(center=center, rotation=rotation, major=major, minor=minor, **common)
    rotation = rot_y(yaw)
    if class_name == "cube":
        hx, hz = size * rng.uniform(0.75, 1.0), size * rng.uniform(0.75, 1.0)
        height = 2.0 * size * rng.uniform(0.7, 1.2)
        normals = np.array([[1, 0, 0], [-1, 0, 0], [0, 0, 1], [0, 0, -1], [0, 1, 0], [0, -1, 0]], dtype=float)
        offsets = np.array([hx, hx, hz, hz, height, 0.0])
        solid = convex_solid(normals, offsets, center=position, rotation=rotation, **common)
        solid.footprint = math.hypot(hx, hz)
        return solid
    if class_name == "pyramid":
        half, height = size * rng.uniform(0.8, 1.0), 2.0 * size * rng.uniform(0.8, 1.3)
        # Each sloped face passes through one base edge (e · p = half at y = 0) and the apex (0, height, 0).
        sides = np.array([[1, 0, 0], [-1, 0, 0], [0, 0, 1], [0, 0, -1]], dtype=float)
        normals = np.concatenate([height * sides + np.array([0.0, half, 0.0]), [[0.0, -1.0, 0.0]]])
        offsets = np.array([half * height] * 4 + [0.0])
        solid = convex_solid(normals, offsets, center=position, rotation=rotation, **common)
        solid.footprint = half * math.sqrt(2.0)
        return solid
    raise ValueError(f"unknown object class {class_name!r}")


@dataclass
class Scene:
    """A sampled scene: camera pose, surfaces (the room's planes first, then the objects), light, noise, factors."""

    camera_height: float
    pitch: float
    yaw: float
    surfaces: list[Surface]
    light_dir: np.ndarray
    ambient: float
    light_strength: float
    noise_std: float
    texture_freq: float
    factors: dict[str, float]


def _jitter_colour(rng: np.random.Generator, base: tuple[float, float, float]) -> np.ndarray:
    colour = np.asarray(base) * rng.uniform(0.85, 1.1) + rng.normal(0.0, 0.05, size=3)
    return np.clip(colour, 0.03, 1.0)


def sample_scene(rng: np.random.Generator, max_objects: int) -> Scene:
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
    half_fov = math.tan(math.radians(FOV_DEG) / 2.0)

    num_objects = 1 + int(rng.binomial(max_objects - 1, u)) if max_objects > 1 else 1
    classes = [OBJECT_CLASSES[i] for i in rng.permutation(len(OBJECT_CLASSES))[:num_objects]]
    texture_freq = _TEXTURE_FREQ[0] + (_TEXTURE_FREQ[1] - _TEXTURE_FREQ[0]) * harder()
    textured_prob = 0.2 + 0.7 * u
    in_front_prob = 0.1 + 0.7 * u  # clutter placed between the camera and the main object → occlusion

    objects: list[Surface] = []
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
    surfaces: list[Surface] = [
        Plane(
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
        Plane(
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
            Plane(
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
    return Scene(
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


def difficulty_score(factors: dict[str, float], max_objects: int) -> float:
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
