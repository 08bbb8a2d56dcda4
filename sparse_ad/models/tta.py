"""Test-time augmentation: score mirrored and turned copies of a frame, average per voxel.

The views are the symmetries of the grid's x-y square (flips of x and y, the x <-> y swap):
each maps the occupied voxels one-to-one onto voxels of the same grid, so every view scores
exactly the input voxels and averaging needs no resampling or key join. Training already
shows the model these poses (rotation about z by up to 180 degrees, mirroring in y), so no
view is out of distribution; the strided convolutions pool different 2x2x2 cells in a
mirrored copy, which is what makes the views disagree and the average steadier.
"""

from __future__ import annotations

import torch

from sparse_ad.models.spunet import VOXEL_FEATURES

# (swap x<->y, mirror x, mirror y), in the order views are used: the first four need no swap
# (fine for any grid), the last four only for a square x-y grid.
VIEWS = ((False, False, False), (False, False, True), (False, True, False), (False, True, True),
         (True, False, False), (True, False, True), (True, True, False), (True, True, True))
_OX, _OY = VOXEL_FEATURES.index("offset_x"), VOXEL_FEATURES.index("offset_y")


def check_views(n_views: int, shape) -> None:
    """Refuse a view count the grid cannot take (a config error, named)."""
    from sparse_ad.config import TEST_VIEW_COUNTS
    from sparse_ad.errors import ConfigError

    if n_views not in TEST_VIEW_COUNTS:
        raise ConfigError(f"model.test_views: expected one of {TEST_VIEW_COUNTS}, found {n_views}")
    if n_views == 8 and shape[0] != shape[1]:
        raise ConfigError(f"model.test_views=8 swaps x and y, which needs a square x-y grid; the grid is "
                          f"{tuple(shape)}: use 4")


def view(features: torch.Tensor, coords: torch.Tensor, shape, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, coords) of view `v`: the same voxels, mirrored/swapped in x-y, with the
    per-voxel point offsets moved along (mirrored offsets change sign, swapped ones trade places)."""
    swap, mx, my = VIEWS[v]
    if v == 0:
        return features, coords
    f, c = features.clone(), coords.clone()
    if swap:
        c[:, [0, 1]] = c[:, [1, 0]]
        f[:, [_OX, _OY]] = f[:, [_OY, _OX]]
    for axis, mirrored, col in ((0, mx, _OX), (1, my, _OY)):
        if mirrored:
            c[:, axis] = int(shape[axis]) - 1 - c[:, axis]
            f[:, col] = -f[:, col]
    return f, c


def stacked_views(features: torch.Tensor, coords: torch.Tensor, batch_index: torch.Tensor, batch_size: int,
                  shape, views: int):
    """All `views` copies of a batch as one batch of views x batch_size frames: (features,
    coords, batch_index, batch_size). Rows come view by view in the input's row order (view v
    of frame b is batch element v * batch_size + b), so per-view outputs reshape to (views, M)."""
    if views == 1:
        return features, coords, batch_index, batch_size
    copies = [view(features, coords, shape, v) for v in range(views)]
    return (torch.cat([f for f, _ in copies]), torch.cat([c for _, c in copies]),
            torch.cat([batch_index + v * batch_size for v in range(views)]), batch_size * views)
