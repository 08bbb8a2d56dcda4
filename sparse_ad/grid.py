"""The AnoVox voxel grid: the one place where sensor → grid → voxel-index math lives.

The generator maps a point `p` seen by a sensor set at `location` (metres) with `rotation`
(degrees) onto its grid as

    p' = R(-a, -b, -c) @ p - location,   R(a, b, c) = Rx(a) @ Ry(b) @ Rz(c)
    q  = p' + offset                     keep 0 <= q < shape * resolution on every axis
    idx = floor(q / resolution)

(yes, the location is subtracted: that is what the generator does). Everything here works
in float64 so that every path (numpy, numba CPU, numba CUDA) computes the same indices bit
for bit; the voxelizer kernels repeat the `q`/`idx` steps inline in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sparse_ad.errors import ConfigError

ANOVOX_RESOLUTION = 0.5
ANOVOX_SHAPE = (1000, 1000, 64)
ANOVOX_OFFSET = (250.0, 250.0, 16.0)


@dataclass(frozen=True)
class VoxelGrid:
    """A regular grid: `resolution` metres per voxel, `shape` voxels along (x, y, z), and
    `offset` metres added to grid-frame points so the grid starts at 0."""

    resolution: float = ANOVOX_RESOLUTION
    shape: tuple[int, int, int] = ANOVOX_SHAPE
    offset: tuple[float, float, float] = ANOVOX_OFFSET

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        offset = tuple(float(o) for o in self.offset)
        if len(shape) != 3 or len(offset) != 3:
            raise ConfigError(f"grid shape and offset need 3 values each, got {self.shape} and {self.offset}")
        if not (self.resolution > 0) or min(shape) <= 0:
            raise ConfigError(f"grid resolution and shape must be positive, got {self.resolution} and {shape}")
        object.__setattr__(self, "resolution", float(self.resolution))
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "offset", offset)

    # --- derived quantities -------------------------------------------------------------
    @property
    def extent(self) -> tuple[float, float, float]:
        """Size of the grid in metres along (x, y, z)."""
        return tuple(s * self.resolution for s in self.shape)

    @property
    def num_voxels(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]

    def with_resolution(self, resolution: float) -> VoxelGrid:
        """The same box (extent and offset) cut into voxels of another size."""
        if not (np.isfinite(resolution) and resolution > 0):
            raise ConfigError(f"resolution must be a positive number of metres, got {resolution}")
        shape = []
        for e in self.extent:
            n = e / resolution
            if abs(n - round(n)) > 1e-6:
                raise ConfigError(
                    f"resolution {resolution} does not divide the grid extent {self.extent}; "
                    "pick a resolution that does (e.g. 0.25, 0.2, 0.1)"
                )
            shape.append(int(round(n)))
        return VoxelGrid(resolution, tuple(shape), self.offset)

    # --- keys ---------------------------------------------------------------------------
    def keys(self, coords):
        """Linear keys `ix + iy*NX + iz*NX*NY` (int64) of integer coords (M, 3)."""
        nx, ny, _ = self.shape
        if isinstance(coords, np.ndarray):
            c = coords.astype(np.int64, copy=False)
        else:  # torch tensor
            c = coords.long()
        return c[:, 0] + c[:, 1] * nx + c[:, 2] * (nx * ny)

    def decode(self, keys):
        """Inverse of `keys`: (M,) int64 → (M, 3) int64 coords."""
        nx, ny, _ = self.shape
        if isinstance(keys, np.ndarray):
            k = keys.astype(np.int64, copy=False)
            return np.stack([k % nx, (k // nx) % ny, k // (nx * ny)], axis=1)
        import torch

        k = keys.long()
        return torch.stack([k % nx, torch.div(k, nx, rounding_mode="floor") % ny,
                            torch.div(k, nx * ny, rounding_mode="floor")], dim=1)

    # --- indexing (numpy reference; kernels repeat these steps) --------------------------
    def index(self, points_grid_frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Voxel index (N, 3) int64 and a validity mask (N,) for grid-frame points (N, >=3).

        Invalid points (not finite, or outside the grid) get index -1 on every axis.
        """
        q = np.asarray(points_grid_frame)[:, :3].astype(np.float64) + np.asarray(self.offset)
        with np.errstate(invalid="ignore"):
            idx = np.floor(q / self.resolution)
            valid = np.all((q >= 0) & (q < np.asarray(self.extent)), axis=1)
            # floor(q / r) may round up to `shape` for a non-power-of-two r; guard it.
            valid &= np.all(idx < np.asarray(self.shape), axis=1)
        idx = np.where(valid[:, None], idx, -1).astype(np.int64)
        return idx, valid

    def point_keys(self, points_grid_frame: np.ndarray) -> np.ndarray:
        """Linear key (N,) int64 of the voxel each grid-frame point falls in; -1 outside the grid."""
        idx, valid = self.index(points_grid_frame)
        return np.where(valid, self.keys(np.maximum(idx, 0)), -1)

    def remainder(self, points_grid_frame: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """`q - resolution * idx`: where a point sits inside its voxel, from the minimum corner."""
        q = np.asarray(points_grid_frame)[:, :3].astype(np.float64) + np.asarray(self.offset)
        return q - self.resolution * idx


# --- sensor frame → grid frame ----------------------------------------------------------

def rotation_matrix(rotation_deg) -> np.ndarray:
    """`R(a, b, c) = Rx(a) @ Ry(b) @ Rz(c)` with angles in degrees (float64)."""
    a, b, c = (math.radians(float(v)) for v in rotation_deg)
    ca, sa, cb, sb, cc, sc = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(c), math.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]], dtype=np.float64)
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]], dtype=np.float64)
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]], dtype=np.float64)
    return rx @ ry @ rz


@dataclass(frozen=True)
class SensorTransform:
    """How the generator moves one sensor set's points into the grid frame.

    `location_sign` and `negate_rotation` exist so that `check-alignment` can try the
    alternatives; the AnoVox generator uses the defaults (-1: subtract, True: negate).
    `flip_y` negates y first (for copies that kept CARLA's left-handed y).
    """

    location: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    location_sign: float = -1.0
    negate_rotation: bool = True
    flip_y: bool = False

    def matrix(self) -> np.ndarray:
        """3x3 rotation applied before the translation."""
        rot = tuple(-v for v in self.rotation) if self.negate_rotation else self.rotation
        return rotation_matrix(rot)

    @property
    def translation(self) -> np.ndarray:
        return self.location_sign * np.asarray(self.location, dtype=np.float64)

    @property
    def is_identity_rotation(self) -> bool:
        return all(float(v) == 0.0 for v in self.rotation)

    def apply(self, points):
        """Sensor-frame xyz (N, >=3), numpy or torch → grid-frame xyz (N, 3) float64.

        Extra columns are not returned; keep them from the input. The rotation is skipped
        when it is zero, so the mono case is exactly `p - location` in float64.
        """
        if isinstance(points, np.ndarray):
            p = points[:, :3].astype(np.float64)
            if self.flip_y:
                p[:, 1] = -p[:, 1]
            if not self.is_identity_rotation:
                p = p @ self.matrix().T
            p += self.translation   # p is a fresh array: in place, same values as p + t
            return p
        import torch

        p = points[:, :3].to(torch.float64)
        if self.flip_y:
            p = p * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64, device=p.device)
        if not self.is_identity_rotation:
            p = p @ torch.as_tensor(self.matrix().T, device=p.device)
        return p + torch.as_tensor(self.translation, device=p.device)
