"""Sensor sets, their AnoVox names and `sensor_setup.json`, and the ray patterns.

Frames used here:
- sensor frame: x forward, y left, z up, origin at the sensor (what the files hold);
- ego frame: the same axes, origin on the ground under the ego's centre;
- grid frame: what `SensorTransform(location, rotation).apply` makes of sensor points.

The generator's grid transform subtracts the location, so for the reference set at
(0, 0, 1.8) the grid frame is the ego frame shifted down by 3.6 m (ground at z = -3.6).
Every other set is placed where that same transform maps its points onto the same grid
frame: origin (0, 0, 3.6) - location in the ego frame, axes R(-rotation). For the AnoVox
stereo sets ((0, -+1, 1.8), yaw -+15) that is exactly where CARLA mounts them (the y sign
and the yaw sign both flip with the left-handed → right-handed y negation).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from sparse_ad.grid import SensorTransform

LIDAR, SEMANTIC_LIDAR = "LIDAR", "SEMANTIC-LIDAR"
CAMERA_TYPES = ("RGB-CAM", "DEPTH_CAM", "SEMANTIC-CAM", "INSTANCE-CAM")

TICK_S = 0.1
"""The generator's fixed simulation step (s); one LiDAR sweep per tick."""
DEFAULT_POINTS_PER_SWEEP = 100_000
"""LiDAR shots per sweep: AnoVox's points_per_second (1e6) times one tick. 75-90 % of them
return (the upper channels see sky between buildings and trees)."""
LIDAR_DROPOUT = 0.02
"""Share of LIDAR returns dropped at random (the SEMANTIC-LIDAR keeps all). AnoVox sets
CARLA's dropoff_general_rate to 0.0; this small rate keeps readers from assuming that the
two point files are row-aligned. Recorded as `dropoff_rate` in sensor_setup.json."""
CAMERA_STRIDE = 2
"""Pixel stride of the depth/semantic camera emulation (768x512 → 384x256 rays): adds about
20 % voxels to the semantic LiDAR's (stride 1: 33 %, stride 4: 11 %, at 4x / 0.25x the cost)."""
CAMERA_MAX_RANGE = 100.0
"""The generator drops back-projected camera points farther than 100 m (norm)."""

LIDAR_ARGS = {
    "range": 100.0, "upper_fov": 15.0, "lower_fov": -25.0, "channels": 64,
    "rotation_frequency": 200.0, "points_per_second": 1000000, "noise_stddev": 0.1,
    "dropoff_rate": 0.0, "dropoff_intensity_limit": 0.0, "dropoff_zero_intensity": 0.0,
}
CAMERA_ARGS = {"image_height": 512, "image_width": 768, "camera_fov": 90.0}

REFERENCE_LOCATION = (0, 0, 1.8)


@dataclass(frozen=True)
class SensorSet:
    """One mount: a LiDAR, a semantic LiDAR and (unsaved) cameras at one pose, in the
    generator's convention (location in metres, rotation (roll, pitch, yaw) in degrees)."""

    location: tuple
    rotation: tuple

    @cached_property
    def transform(self) -> SensorTransform:
        return SensorTransform(tuple(float(v) for v in self.location), tuple(float(v) for v in self.rotation))

    @cached_property
    def axes(self) -> np.ndarray:
        """(3, 3) sensor → ego rotation (the grid transform's matrix)."""
        return self.transform.matrix()

    @cached_property
    def origin(self) -> np.ndarray:
        """Sensor origin in the ego frame (see the module docstring)."""
        return 2.0 * np.asarray(REFERENCE_LOCATION, np.float64) - np.asarray(self.location, np.float64)

    def folder(self, sensor_type: str, args_hash: int) -> str:
        return f"{sensor_type}{tuple(self.location)}{tuple(self.rotation)}_{args_hash}"


SENSOR_SETS = {
    "mono": (SensorSet((0, 0, 1.8), (0, 0, 0)),),
    "stereo": (SensorSet((0, 0, 1.8), (0, 0, 0)),
               SensorSet((0, -1, 1.8), (0, 0, -15)),
               SensorSet((0, 1, 1.8), (0, 0, 15))),
}
"""AnoVox's MONO_SENSOR_SETS and STEREO_SENSOR_SETS."""


def lidar_args(points_per_sweep: int) -> dict:
    return dict(LIDAR_ARGS, points_per_second=int(round(points_per_sweep / TICK_S)), dropoff_rate=LIDAR_DROPOUT)


def args_hash(args: dict, seed: int) -> int:
    """Stands in for the generator's `abs(hash(json.dumps(args, sort_keys=True)))`, which
    changes with every Python process; here it is fixed by the seed."""
    digest = hashlib.blake2b(f"{seed}:{json.dumps(args, sort_keys=True)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass(frozen=True)
class SensorNames:
    """Folder names of the saved sensors of one set."""

    lidar: str
    semantic: str


def sensor_setup(sets, points_per_sweep: int, seed: int) -> tuple[dict, list[SensorNames]]:
    """`sensor_setup.json` content (keyed by folder name, in the generator's order) and the
    LiDAR folder names per set. Cameras are listed with save_data false: no PNGs are
    written (the generator does the same for sets without cameras)."""
    l_args, c_args = lidar_args(points_per_sweep), dict(CAMERA_ARGS)
    l_hash, c_hash = args_hash(l_args, seed), args_hash(c_args, seed)
    setup, names = {}, []
    for s in sets:
        entries = [(t, ".png", c_args, c_hash, False) for t in CAMERA_TYPES]
        entries += [(LIDAR, ".npy", l_args, l_hash, True), (SEMANTIC_LIDAR, ".npy", l_args, l_hash, True)]
        for stype, ending, args, h, save in entries:
            setup[s.folder(stype, h)] = {
                "sensor_type": stype, "file_ending": ending, "location": list(s.location),
                "rotation": list(s.rotation), "args": args, "save_data": save,
            }
        names.append(SensorNames(s.folder(LIDAR, l_hash), s.folder(SEMANTIC_LIDAR, l_hash)))
    return setup, names


def lidar_directions(points_per_sweep: int, phase: float) -> np.ndarray:
    """(channels * n_azimuth, 3) unit directions in the sensor frame, channel-major: 64
    channels evenly from +15 to -25 degrees, n_azimuth = points_per_sweep / 64 steps over
    360 degrees starting at `phase` (a fraction of one step)."""
    a = LIDAR_ARGS
    elev = np.radians(np.linspace(a["upper_fov"], a["lower_fov"], a["channels"]))
    n_az = max(1, int(round(points_per_sweep / a["channels"])))
    az = (np.arange(n_az) + phase) * (2.0 * math.pi / n_az)
    ce, se = np.cos(elev)[:, None], np.sin(elev)[:, None]
    d = np.stack([ce * np.cos(az)[None, :], ce * np.sin(az)[None, :], np.broadcast_to(se, (len(elev), n_az))],
                 axis=-1)
    return np.ascontiguousarray(d.reshape(-1, 3))


def camera_directions(stride: int = CAMERA_STRIDE) -> np.ndarray:
    """Unit directions (sensor frame) of every `stride`-th pixel of the 768x512, 90-degree
    pinhole camera, back-projected as the generator does: pixel (j, i) → (x right, y down,
    z forward) = ((j - cx) / f, (i - cy) / f, 1), then to x forward, y left, z up."""
    w, h = CAMERA_ARGS["image_width"], CAMERA_ARGS["image_height"]
    f = w / (2.0 * math.tan(math.radians(CAMERA_ARGS["camera_fov"]) / 2.0))
    j = np.arange(stride // 2, w, stride, dtype=np.float64)
    i = np.arange(stride // 2, h, stride, dtype=np.float64)
    jj, ii = np.meshgrid(j, i)
    d = np.stack([np.ones_like(jj), -(jj - w / 2.0) / f, -(ii - h / 2.0) / f], axis=-1).reshape(-1, 3)
    return np.ascontiguousarray(d / np.linalg.norm(d, axis=1, keepdims=True))
