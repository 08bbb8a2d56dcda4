"""Test-time augmentation: each view is the voxelization of the mirrored frame, and the
averaged scores do not depend on which of the views' poses the frame came in."""

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sparse_ad.engine.validate import frame_scores
from sparse_ad.errors import ConfigError
from sparse_ad.grid import VoxelGrid
from sparse_ad.models.spunet import SpUNet, voxel_features
from sparse_ad.models.tta import VIEWS, check_views, view
from sparse_ad.voxelize import voxelize

# offset = resolution * shape / 2 in x and y: the grid is centred on x = y = 0, so mirroring
# voxel indices is mirroring points about the origin
GRID = VoxelGrid(0.5, (40, 40, 8), (10.0, 10.0, 2.0))


def _points(seed, n=3000):
    rng = np.random.default_rng(seed)
    xyz = rng.uniform([-9.9, -9.9, -1.9], [9.9, 9.9, 1.9], (n, 3))
    return np.concatenate([xyz, rng.uniform(0, 1, (n, 1))], axis=1)


def _voxels(points):
    vox = voxelize(points, GRID)
    order = np.argsort(vox.keys)
    return vox.coords[order].astype(np.int64), voxel_features(vox, GRID)[order]


@pytest.mark.parametrize("v", range(len(VIEWS)))
def test_each_view_is_the_voxelization_of_the_mirrored_points(v):
    pts = _points(v)
    coords, feats = _voxels(pts)
    f, c = view(torch.from_numpy(feats), torch.from_numpy(coords), GRID.shape, v)
    swap, mx, my = VIEWS[v]
    moved = pts.copy()
    if swap:
        moved[:, [0, 1]] = moved[:, [1, 0]]
    moved[:, 0] *= -1 if mx else 1
    moved[:, 1] *= -1 if my else 1
    want_c, want_f = _voxels(moved)
    keys = GRID.keys(c.numpy())
    order = np.argsort(keys)
    np.testing.assert_array_equal(c.numpy()[order], want_c)
    np.testing.assert_allclose(f.numpy()[order], want_f, atol=1e-6)
    if v:
        assert not np.array_equal(c.numpy(), coords)  # a real move, not the identity


def _batch(seed):
    coords, feats = _voxels(_points(seed, 1500))
    return SimpleNamespace(features=torch.from_numpy(feats), coords=torch.from_numpy(coords).int(),
                           batch_index=torch.zeros(len(coords), dtype=torch.int32), batch_size=1)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_averaged_scores_do_not_depend_on_the_pose_among_the_views(n):
    torch.manual_seed(0)
    model = SpUNet(6, 8, (8, 16), blocks_per_level=1).eval()
    vb = _batch(n)
    ref = frame_scores(model, vb, GRID, amp=False, views=n)
    for g in range(1, n):
        f, c = view(vb.features, vb.coords, GRID.shape, g)
        moved = SimpleNamespace(features=f, coords=c, batch_index=vb.batch_index, batch_size=1)
        # rows keep their order through a view, so scores compare row by row
        torch.testing.assert_close(frame_scores(model, moved, GRID, amp=False, views=n), ref, rtol=0, atol=1e-5)
        # while one view alone does see the pose (so the check above has teeth)
        one_view = frame_scores(model, moved, GRID, amp=False) - frame_scores(model, vb, GRID, amp=False)
        assert one_view.abs().max() > 1e-4


def test_view_counts_are_checked():
    check_views(8, (4, 4, 2))
    check_views(4, (4, 6, 2))
    with pytest.raises(ConfigError, match=r"one of \(1, 2, 4, 8\), found 3"):
        check_views(3, (4, 4, 2))
    with pytest.raises(ConfigError, match="square"):
        check_views(8, (4, 6, 2))


def test_cli_refuses_an_odd_view_count():
    r = subprocess.run([sys.executable, "-m", "sparse_ad.cli", "eval", "--checkpoint", "x.pt", "--out", "o",
                        "--views", "3"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr
