"""The loader's numba passes against their numpy forms: bit for bit, including the edges
(points on voxel faces, outside the grid, NaN/inf, tags beyond the lookup table)."""

import numpy as np
import pytest

from sparse_ad.config import AugmentConfig
from sparse_ad.data.dataset import augment
from sparse_ad.data.labels import GroundTruth, lookup_tags, target_table, targets_from_tags
from sparse_ad.data.per_point import finite_rows, point_targets
from sparse_ad.grid import VoxelGrid
from sparse_ad.tags import MAX_TAG

GRIDS = [VoxelGrid(), VoxelGrid().with_resolution(0.1), VoxelGrid(0.3, (40, 30, 10), (6.0, 4.5, 1.5))]


def _points(rng, grid: VoxelGrid, n: int) -> np.ndarray:
    """Grid-frame points: inside, on voxel faces, just outside every face, a few NaN/inf."""
    lo = -np.asarray(grid.offset)
    hi = lo + np.asarray(grid.extent)
    p = np.concatenate([rng.uniform(lo - 2, hi + 2, size=(n, 3)), rng.uniform(0, 1, size=(n, 1))], axis=1)
    faces = rng.integers(0, np.asarray(grid.shape) + 1, size=(n // 4, 3)) * grid.resolution + lo
    p[: n // 4, :3] = faces                                  # exactly on voxel faces / the far faces
    p[n // 4: n // 4 + 8, :3] = hi                           # the far corner itself (outside)
    p[n // 4 + 8: n // 4 + 16, :3] = np.nextafter(hi, -np.inf)   # just inside it
    p[-3, 0], p[-2, 1], p[-1, 2] = np.nan, np.inf, -np.inf
    return p


def _numpy_targets(points, gt, grid, lut):
    return targets_from_tags(lookup_tags(grid.point_keys(points), gt), lut)


@pytest.mark.parametrize("grid", GRIDS, ids=["anovox", "0.1m", "small"])
def test_point_targets_equal_the_numpy_join(grid):
    rng = np.random.default_rng(0)
    pts = _points(rng, grid, 4000)
    keys = grid.point_keys(pts)
    inside = np.unique(keys[keys >= 0])
    # GT: most of the occupied voxels, plus empty ones; tags anywhere in [0, 2^16) incl. > MAX_TAG
    chosen = np.union1d(rng.choice(inside, size=len(inside) * 3 // 4, replace=False),
                        rng.integers(0, grid.num_voxels, size=200))
    rows = np.concatenate([grid.decode(chosen), rng.integers(0, 2**16, size=(len(chosen), 1))], axis=1)
    rows[: len(rows) // 2, 3] = rng.integers(0, MAX_TAG + 1, size=len(rows) // 2)
    rows[:: 7, 3] = 30                                       # an anomaly tag
    gt = GroundTruth.from_rows(rows.astype(np.uint16), grid)
    lut = target_table()
    got = point_targets(pts, gt.keys, gt.tags, grid, lut)
    want = _numpy_targets(pts, gt, grid, lut)
    assert got.dtype == np.int8 and np.array_equal(got, want)
    assert set(np.unique(want)) == {-1, 0, 1}                # every branch was taken


def test_point_targets_without_ground_truth_are_all_ignored():
    pts = _points(np.random.default_rng(1), GRIDS[0], 100)
    empty = np.zeros(0, np.int64)
    assert (point_targets(pts, empty, empty, GRIDS[0], target_table()) == -1).all()


def test_finite_rows_drops_exactly_the_nonfinite_rows():
    p = np.random.default_rng(2).normal(size=(50, 5))
    assert finite_rows(p) is p
    p[[3, 7, 7, 40], [0, 2, 4, 1]] = [np.nan, np.inf, np.nan, -np.inf]
    assert np.array_equal(finite_rows(p), p[np.isfinite(p).all(axis=1)]) and len(finite_rows(p)) == 47


def _numpy_augment(points, cfg, rng):
    """The numpy form of `dataset.augment` (same draws, same operations)."""
    out = points.copy()
    theta = np.deg2rad(rng.uniform(-cfg.rotate_z_deg, cfg.rotate_z_deg))
    c, s = np.cos(theta), np.sin(theta)
    x, y = out[:, 0].copy(), out[:, 1].copy()
    out[:, 0], out[:, 1] = c * x - s * y, s * x + c * y
    if cfg.flip_y and rng.random() < 0.5:
        out[:, 1] = -out[:, 1]
    out[:, :3] *= rng.uniform(*cfg.scale)
    if cfg.jitter_m > 0:
        out[:, :3] += rng.normal(0.0, cfg.jitter_m, size=(len(out), 3))
    return out


@pytest.mark.parametrize("cfg", [AugmentConfig(), AugmentConfig(flip_y=False, jitter_m=0.0),
                                 AugmentConfig(rotate_z_deg=180.0, scale=(0.5, 2.0), jitter_m=0.05)])
def test_augment_equals_its_numpy_form_bit_for_bit(cfg):
    pts = np.random.default_rng(3).normal(scale=40.0, size=(20000, 5))
    for seed in range(8):
        got = augment(pts, cfg, np.random.default_rng(seed))
        want = _numpy_augment(pts, cfg, np.random.default_rng(seed))
        assert np.array_equal(got, want), f"seed {seed}: max diff {np.abs(got - want).max()}"
    assert np.array_equal(got[:, 3:], pts[:, 3:])            # intensity and lag untouched
