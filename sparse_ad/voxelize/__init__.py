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
    check_labels(labels, points.shape[0])
    if isinstance(points, np.ndarray):
        if points.dtype not in (np.float32, np.float64):   # as the CUDA path: other numbers become float32
            if points.dtype.kind not in "fiu":
                raise SparseADError(f"voxelize expects numeric points (float32 or float64), got dtype {points.dtype}")
            points = points.astype(np.float32)
        return _cpu().voxelize_cpu(points, grid, None if labels is None else np.asarray(labels))
    import torch

    if isinstance(points, torch.Tensor):
        if points.is_cuda:
            from sparse_ad.voxelize.cuda import voxelize_cuda

            return voxelize_cuda(points, grid, labels)
        points = points.detach()
        if points.dtype not in (torch.float32, torch.float64):
            points = points.float()
        tags = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
        return _cpu().voxelize_cpu(points.numpy(), grid, tags)
    raise SparseADError(f"voxelize expects a numpy array or torch tensor, got {type(points).__name__}")


def check_labels(labels, n: int) -> None:
    """Labels are None or an integer array/tensor of shape (N,) (a float tag would be
    truncated, a NaN one wrap to INT32_MIN, so neither is guessed at)."""
    if labels is None:
        return
    if not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
        raise SparseADError(f"labels must be an integer array or tensor of shape ({n},), got {type(labels).__name__}")
    integer = str(labels.dtype).replace("torch.", "").startswith(("int", "uint"))
    if tuple(labels.shape) != (n,) or not integer:
        raise SparseADError(f"labels must be integer of shape ({n},), got {labels.dtype} of shape "
                            f"{tuple(labels.shape)}")


def _cpu():
    from sparse_ad.voxelize import cpu

    return cpu
