"""The one place a `spconv.SparseConvTensor` is built, and the one place the conv algorithm
is chosen from the device.

spconv wants int32 indices (M, 4) = (batch, then the spatial axes in the order of
`spatial_shape`). We use the grid order (x, y, z) with `spatial_shape = grid.shape`, so a
voxel's row is `[b, ix, iy, iz]`. spconv itself only asserts the dtype; a batch index or
coordinate out of range silently corrupts its hash tables, so we check them here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import spconv.pytorch as spconv
import torch
from spconv.core import ConvAlgo

from sparse_ad.errors import SparseADError


def conv_algo(device: torch.device | str) -> ConvAlgo:
    """Native on CPU (the only algorithm spconv runs there); on CUDA spconv's own default for
    kernels of at most 32 taps (ours: 27 and 8), the mask implicit GEMM."""
    return ConvAlgo.MaskImplicitGemm if torch.device(device).type == "cuda" else ConvAlgo.Native


def to_sparse_tensor(features, coords, batch_index, spatial_shape: Sequence[int], batch_size: int,
                     check_range: bool = True) -> spconv.SparseConvTensor:
    """Build a SparseConvTensor from per-voxel rows.

    features:    (M, C) float   model input, one row per voxel
    coords:      (M, 3) int     voxel index (ix, iy, iz), unique within a batch element
    batch_index: (M,)   int     batch element of each row, in [0, batch_size)
    spatial_shape: (3,)         grid shape (nx, ny, nz)

    numpy arrays or torch tensors; the tensor lands on the device of `features`. Rows keep
    their order (spconv's submanifold outputs follow it). `check_range` costs one host sync
    (a single reduced flag); uniqueness is not checked (the voxelizer guarantees it).
    """
    features = torch.as_tensor(features)
    device = features.device
    coords = torch.as_tensor(coords, device=device)
    batch_index = torch.as_tensor(batch_index, device=device)
    shape = tuple(int(s) for s in np.asarray(spatial_shape).reshape(-1))

    if features.ndim != 2 or not features.is_floating_point() or features.dtype == torch.float64:
        raise SparseADError(f"features: expected a float32 (or half) (M, C) array, found {features.dtype} "
                            f"of shape {tuple(features.shape)}; cast with .float() / .astype(np.float32)")
    m = features.shape[0]
    if m == 0:
        raise SparseADError("features: expected at least one voxel, found 0 rows; skip empty frames "
                            "before building a sparse tensor")
    _check_int(coords, (m, 3), "coords")
    _check_int(batch_index, (m,), "batch_index")
    if len(shape) != 3 or min(shape) <= 0:
        raise SparseADError(f"spatial_shape: expected 3 positive sizes (nx, ny, nz), found {shape}")
    if int(batch_size) < 1:
        raise SparseADError(f"batch_size: expected >= 1, found {batch_size}")

    if check_range:
        upper = torch.tensor(shape, device=device)
        bad = ((coords < 0) | (coords >= upper)).any(dim=1) | (batch_index < 0) | (batch_index >= batch_size)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise SparseADError(
                f"row {row}: expected batch index in [0, {batch_size}) and coords within spatial_shape "
                f"{shape}, found batch {int(batch_index[row])} at {tuple(coords[row].tolist())}")

    indices = torch.cat([batch_index.reshape(-1, 1).int(), coords.int()], dim=1).contiguous()  # (M, 4)
    return spconv.SparseConvTensor(features.contiguous(), indices, list(shape), int(batch_size))


def _check_int(t: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or tuple(t.shape) != shape:
        raise SparseADError(f"{name}: expected an integer array of shape {shape}, found {t.dtype} "
                            f"of shape {tuple(t.shape)}")
