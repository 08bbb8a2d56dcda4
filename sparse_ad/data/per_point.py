"""The frame loader's per-point work, each as one numba pass over the points.

A loader worker spends its time on three per-point steps: dropping non-finite points,
labelling every point with the target of the ground-truth voxel it falls in, and the seeded
augmentation. Written as numpy expressions they allocate a dozen (N, 3) temporaries each
(~40 ms for an 86k-point frame on one core); as loops they touch each point once.

They compute exactly what the numpy forms compute — the same float64 operations in the
same order (numba does not fuse a multiply and an add unless asked to), the voxel key from
`voxelize.cpu.point_key` (the voxelizer's own, equal to `VoxelGrid.point_keys`) — so labels
and augmented points are bit-identical to the references in tests/test_per_point.py.
"""

from __future__ import annotations

import numba
import numpy as np

from sparse_ad.grid import VoxelGrid
from sparse_ad.tags import MAX_TAG
from sparse_ad.voxelize.cpu import point_key

IGNORE = np.int8(-1)


def finite_rows(points: np.ndarray) -> np.ndarray:
    """`points` without the rows that hold a NaN or inf (the same array if there is none)."""
    bad = _count_nonfinite(points)
    return points if bad == 0 else points[np.isfinite(points).all(axis=1)]


@numba.njit(cache=True)
def _count_nonfinite(points):
    bad = 0
    for i in range(points.shape[0]):
        for j in range(points.shape[1]):
            if not np.isfinite(points[i, j]):
                bad += 1
                break
    return bad


def point_targets(points: np.ndarray, gt_keys: np.ndarray, gt_tags: np.ndarray, grid: VoxelGrid,
                  lut: np.ndarray) -> np.ndarray:
    """(N,) int8 target of the GT voxel each grid-frame point (N, >=3) float64 falls in:
    `lut[tag]`, or -1 outside the grid or where the GT has no voxel. gt_keys ascending."""
    (ox, oy, oz), (ex, ey, ez), (nx, ny, nz) = grid.offset, grid.extent, grid.shape
    return _point_targets(points, np.ascontiguousarray(gt_keys, np.int64), np.ascontiguousarray(gt_tags, np.int64),
                          lut.astype(np.int8, copy=False), ox, oy, oz, grid.resolution, ex, ey, ez, nx, ny, nz)


@numba.njit(cache=True)
def _point_targets(points, gt_keys, gt_tags, lut, ox, oy, oz, res, ex, ey, ez, nx, ny, nz):
    n, g = points.shape[0], gt_keys.shape[0]
    out = np.empty(n, np.int8)
    for i in range(n):
        k = point_key(points[i, 0], points[i, 1], points[i, 2], ox, oy, oz, res, ex, ey, ez, nx, ny, nz)
        t = IGNORE
        if k >= 0 and g > 0:
            pos = np.searchsorted(gt_keys, k)
            if pos < g and gt_keys[pos] == k:
                t = lut[min(max(gt_tags[pos], 0), MAX_TAG)]
        out[i] = t
    return out


@numba.njit(cache=True)
def rotate_flip_scale(points, c, s, flip, scale):
    """A copy of grid-frame points (N, C) float64 with xy rotated by (c, s) = (cos, sin),
    y negated if `flip`, xyz scaled; other columns as they are (`dataset.augment`'s steps)."""
    out = points.copy()
    for i in range(points.shape[0]):
        x = points[i, 0]
        y = points[i, 1]
        rx = c * x - s * y
        ry = s * x + c * y
        if flip:
            ry = -ry
        out[i, 0] = rx * scale
        out[i, 1] = ry * scale
        out[i, 2] = points[i, 2] * scale
    return out


@numba.njit(cache=True)
def add_xyz(points, delta):
    """points[:, :3] += delta (N, 3), in place."""
    for i in range(points.shape[0]):
        for j in range(3):
            points[i, j] += delta[i, j]
