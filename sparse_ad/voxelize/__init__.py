"""Points → unique voxels on the AnoVox grid (or any `VoxelGrid`).

One entry point, two backends chosen by the input: a numpy array runs the numba `@njit`
CPU path, a torch CUDA tensor runs numba CUDA kernels on its device without a host round
trip. Both follow the same algorithm (see `cpu.py`) and give the same result.
"""

from __future__ import annotations

import numpy as np

from sparse_ad.errors import SparseADError
from sparse_ad.grid import VoxelGrid
from sparse_ad.voxelize.result import Voxels

__all__ = ["Voxels", "voxelize"]


def voxelize(points, grid: VoxelGrid | None = None, labels=None) -> Voxels:
    """Voxelize grid-frame points.

    points: (N, 3+C) xyz already in the grid frame (`SensorTransform.apply`), then C extra
        columns (e.g. intensity) that are averaged per voxel. numpy (float32/float64) or a
        torch CUDA tensor.
    grid:   defaults to the AnoVox grid (0.5 m, 1000x1000x64, offset (250, 250, 16)).
    labels: optional (N,) integer semantic tags; when given, each voxel gets a label by the
        AnoVox rule (road line wins, else the point nearest the voxel's minimum corner).

    Points that are not finite or lie outside the grid are dropped (point2voxel = -1) and
    counted in `n_nonfinite` / `n_outside`.
    """
    grid = grid or VoxelGrid()
    if not (hasattr(points, "ndim") and hasattr(points, "shape")):
        raise SparseADError(f"voxelize expects a numpy array or torch tensor, got {type(points).__name__}")
    if points.ndim != 2 or points.shape[1] < 3:
        raise SparseADError(f"voxelize expects points of shape (N, 3+C), got {tuple(points.shape)}")
    if labels is not None and labels.shape[0] != points.shape[0]:
        raise SparseADError(f"labels has {labels.shape[0]} rows but points has {points.shape[0]}")
    if isinstance(points, np.ndarray):
        if labels is not None and not isinstance(labels, np.ndarray):
            raise SparseADError("points is a numpy array, so labels must be one too")
        return _cpu().voxelize_cpu(points, grid, labels)
    import torch

    if isinstance(points, torch.Tensor):
        if points.is_cuda:
            from sparse_ad.voxelize.cuda import voxelize_cuda

            return voxelize_cuda(points, grid, labels)
        vox = _cpu().voxelize_cpu(points.numpy(), grid, None if labels is None else labels.numpy())
        return vox
    raise SparseADError(f"voxelize expects a numpy array or torch tensor, got {type(points).__name__}")


def _cpu():
    from sparse_ad.voxelize import cpu

    return cpu
