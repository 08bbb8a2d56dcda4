"""`Voxels`: what voxelization returns, the same on CPU (numpy) and GPU (torch CUDA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Voxels:
    """Unique occupied voxels of one point cloud, in ascending linear-key order.

    Shapes: N input points, M voxels, C extra point columns. On CPU every array is numpy;
    on GPU every array is a torch CUDA tensor (the counters are 0-d tensors, so reading
    them is the only host sync).
    """

    coords: Any        # (M, 3) int32  voxel index (ix, iy, iz)
    keys: Any          # (M,)   int64  linear key ix + iy*NX + iz*NX*NY, strictly ascending
    point2voxel: Any   # (N,)   int64  row of each point's voxel, -1 if dropped
    features: Any      # (M, C) float32 mean of the extra point columns
    counts: Any        # (M,)   int32  points per voxel
    offsets: Any       # (M, 3) float32 mean offset (m) of the points from the voxel centre
    labels: Any        # (M,)   int32  AnoVox label rule, or None when no labels were given
    n_nonfinite: Any   # points dropped for NaN/inf coordinates
    n_outside: Any     # finite points dropped for lying outside the grid

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def num_points(self) -> int:
        return int(self.point2voxel.shape[0])
