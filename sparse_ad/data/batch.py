"""Batching: samples → `Batch` (CPU, in the loader) → `VoxelBatch` (on the step's device).

Voxelization happens in `voxelize_batch`, inside the step, so that on CUDA the points go to
the GPU once and the numba kernels voxelize them there. Each point carries two extra
columns, `is_anomaly` and `is_valid`, that the voxelizer averages like any feature: a voxel
is an anomaly if any of its points is, and scored if any of its points is in the GT and not
ignored. Unaugmented, all points of a voxel share one GT voxel, so this equals the key join.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sparse_ad.data.dataset import Sample
from sparse_ad.data.labels import ANOMALY, IGNORE
from sparse_ad.errors import SparseADError
from sparse_ad.grid import VoxelGrid
from sparse_ad.voxelize import voxelize


@dataclass
class Batch:
    """Loaded frames of one step (CPU). Frames that failed to load are listed in `skipped`."""

    indices: list[int]
    names: list[str]
    points: list[np.ndarray]          # per frame (N_i, 4 or 5) float64: x, y, z, intensity[, sweep lag]
    point_targets: list[np.ndarray]   # per frame (N_i,) int8
    lidar_sees_anomaly: list[bool]    # the frame labels training uses (any sweep)
    skipped: list[str] = field(default_factory=list)
    current_sees_anomaly: list[bool] = field(default_factory=list)   # "anomalies only" (the current sweep)

    def __len__(self) -> int:
        return len(self.names)


def collate(items: list[Sample | SparseADError]) -> Batch:
    samples = [s for s in items if isinstance(s, Sample)]
    return Batch([s.index for s in samples], [s.name for s in samples], [s.points for s in samples],
                 [s.point_targets for s in samples], [s.lidar_sees_anomaly for s in samples],
                 skipped=[str(e) for e in items if isinstance(e, SparseADError)],
                 current_sees_anomaly=[s.lidar_sees_anomaly if s.current_sees_anomaly is None
                                       else s.current_sees_anomaly for s in samples])


@dataclass
class VoxelBatch:
    """Voxels of a batch on one device; rows of frame b are `slice(offsets[b], offsets[b+1])`."""

    coords: torch.Tensor        # (M, 3) int32 voxel index on the grid
    batch_index: torch.Tensor   # (M,) int32
    keys: torch.Tensor          # (M,) int64 linear keys (per frame)
    features: torch.Tensor      # (M, F) float32 model input
    targets: torch.Tensor       # (M,) float32 1 anomaly / 0 normal (meaningless where not valid)
    valid: torch.Tensor         # (M,) bool: voxel is scored (in GT, not ignored)
    frame_labels: torch.Tensor  # (B,) float32: 1 if the frame's LiDAR hits anomaly voxels of its GT
    offsets: list[int]          # (B+1,) row offsets per frame
    names: list[str]

    @property
    def batch_size(self) -> int:
        return len(self.names)


def voxelize_batch(batch: Batch, grid: VoxelGrid, device: torch.device) -> VoxelBatch:
    """Voxelize every frame of `batch` on `device` and build model inputs and targets."""
    from sparse_ad.models.spunet import voxel_features

    parts, offsets = [], [0]
    for b, (pts, tgt) in enumerate(zip(batch.points, batch.point_targets, strict=True)):
        labelled = np.concatenate([pts, (tgt == ANOMALY)[:, None], (tgt != IGNORE)[:, None]], axis=1)
        if device.type == "cuda":
            labelled = torch.from_numpy(labelled).to(device, non_blocking=True)
        vox = voxelize(labelled, grid)
        feats = torch.as_tensor(vox.features, device=device)  # intensity[, lag], is_anomaly, is_valid
        inputs = voxel_features(vox, grid, columns=pts.shape[1] - 3)
        parts.append((torch.as_tensor(inputs, device=device, dtype=torch.float32),
                      torch.as_tensor(vox.coords, device=device),
                      torch.as_tensor(vox.keys, device=device),
                      feats[:, -2] > 0, feats[:, -1] > 0,
                      torch.full((len(vox),), b, dtype=torch.int32, device=device)))
        offsets.append(offsets[-1] + len(vox))
    if not parts:
        raise SparseADError("a batch with no loadable frames")
    features, coords, keys, is_anomaly, valid, batch_index = (torch.cat(t) for t in zip(*parts, strict=True))
    return VoxelBatch(coords=coords.int(), batch_index=batch_index, keys=keys, features=features,
                      targets=is_anomaly.float(), valid=valid,
                      # what the input can show: an anomaly only the camera saw is not a positive bag
                      frame_labels=torch.tensor(batch.lidar_sees_anomaly, dtype=torch.float32, device=device),
                      offsets=offsets, names=list(batch.names))
