"""Training targets: input voxels joined to the ground-truth VOXEL_GRID rows by linear key.

target  1  the GT voxel's tag is in the anomaly set
target  0  any other tag (unknown tags count as normal unless configured)
target -1  ignored: the GT voxel's tag is in the ignore set, or the GT has no such voxel

The join is a sorted search on int64 keys, the same code for numpy (CPU) and torch
(any device), so no coordinate triples are ever compared pairwise and nothing is random:
the target of a voxel is a pure function of the files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparse_ad.errors import ConfigError, SparseADError
from sparse_ad.grid import VoxelGrid
from sparse_ad.tags import DEFAULT_ANOMALY_TAGS, DEFAULT_IGNORE_TAGS, MAX_TAG

ANOMALY, NORMAL, IGNORE = 1, 0, -1


def target_table(anomaly_tags=DEFAULT_ANOMALY_TAGS, ignore_tags=DEFAULT_IGNORE_TAGS) -> np.ndarray:
    """(MAX_TAG + 1,) int8 lookup: tag → 1 anomaly / 0 normal / -1 ignore."""
    bad = sorted(t for t in (*anomaly_tags, *ignore_tags) if not 0 <= t <= MAX_TAG)
    if bad:   # a negative tag would index the table from its end
        raise ConfigError(f"labels: tag(s) {bad} outside 0..{MAX_TAG} (VOXEL_GRID stores tags as uint16); "
                          "fix labels.anomaly_tags / labels.ignore_tags")
    both = set(anomaly_tags) & set(ignore_tags)
    if both:
        raise SparseADError(f"tags {sorted(both)} are both anomaly and ignore tags; pick one in the config")
    lut = np.zeros(MAX_TAG + 1, np.int8)
    lut[list(anomaly_tags)] = ANOMALY
    lut[list(ignore_tags)] = IGNORE
    return lut


@dataclass
class GroundTruth:
    """One frame's GT voxels sorted by linear key, on the device the join will run on."""

    keys: object   # (G,) int64 ascending, unique
    tags: object   # (G,) int64

    @classmethod
    def from_rows(cls, rows: np.ndarray, grid: VoxelGrid, source: str = "VOXEL_GRID") -> GroundTruth:
        """rows: (G, 4) uint16 (ix, iy, iz, tag) as stored; checked against the grid."""
        coords = rows[:, :3].astype(np.int64)
        if len(coords) and (coords.max(axis=0) >= np.asarray(grid.shape)).any():
            raise SparseADError(f"{source}: voxel coordinates exceed the grid shape {grid.shape}; "
                                "set grid.resolution/shape to the ones the ground truth was made with")
        keys = grid.keys(coords)
        order = np.argsort(keys, kind="stable")
        keys, tags = keys[order], rows[order, 3].astype(np.int64)
        if len(keys) > 1 and (np.diff(keys) == 0).any():
            raise SparseADError(f"{source}: duplicate voxel rows; AnoVox writes one row per voxel — "
                                "regenerate it with `sparse-ad voxelize-gt`")
        return cls(keys, tags)

    def to(self, device) -> GroundTruth:
        import torch

        return GroundTruth(torch.as_tensor(self.keys, device=device), torch.as_tensor(self.tags, device=device))


def lookup_tags(keys, gt: GroundTruth):
    """GT tag of each key, -1 where the GT has no such voxel. numpy or torch, same device."""
    if isinstance(keys, np.ndarray):
        pos = np.searchsorted(gt.keys, keys)
        pos = np.minimum(pos, max(len(gt.keys) - 1, 0))
        hit = (gt.keys[pos] == keys) if len(gt.keys) else np.zeros(len(keys), bool)
        return np.where(hit, gt.tags[pos] if len(gt.keys) else 0, -1)
    import torch

    if gt.keys.numel() == 0:
        return torch.full_like(keys, -1)
    pos = torch.searchsorted(gt.keys, keys).clamp_(max=gt.keys.numel() - 1)
    hit = gt.keys[pos] == keys
    return torch.where(hit, gt.tags[pos], torch.full_like(keys, -1))


def targets_from_tags(tags, lut):
    """Per-voxel GT tags (-1 = absent) → targets (1 / 0 / -1), numpy or torch."""
    if isinstance(tags, np.ndarray):
        return np.where(tags >= 0, lut[np.clip(tags, 0, MAX_TAG)], IGNORE).astype(np.int8)
    import torch

    lut_t = torch.as_tensor(lut, device=tags.device)
    return torch.where(tags >= 0, lut_t[tags.clamp(0, MAX_TAG)], torch.full_like(lut_t[:1], IGNORE).expand_as(tags))


def voxel_targets(keys, gt: GroundTruth, lut):
    """Targets of input voxels (by linear key) against one frame's ground truth."""
    return targets_from_tags(lookup_tags(keys, gt), lut)
