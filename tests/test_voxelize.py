"""The numba CPU voxelizer against a plain numpy reference, plus hand-made edge cases.

The reference below shares no code with `cpu.py`: voxels come from `np.unique` over linear
keys, sums from `np.add.at`, and the AnoVox label rule from a python loop per voxel.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_ad.errors import SparseADError
from sparse_ad.grid import VoxelGrid
from sparse_ad.tags import ROAD_LINE
from sparse_ad.voxelize import voxelize

SMALL = VoxelGrid(0.5, (4, 3, 2), (1.0, 0.75, 0.5))          # extent (2, 1.5, 1) m
FINE = VoxelGrid(0.5, (8, 6, 4), (2.0, 1.5, 1.0)).with_resolution(0.1)  # (40, 30, 20) voxels


# --- reference ---------------------------------------------------------------------------
def reference(points: np.ndarray, grid: VoxelGrid, tags: np.ndarray | None = None) -> dict:
    """Straightforward numpy voxelization with the AnoVox label rule."""
    n = points.shape[0]
    q = points[:, :3].astype(np.float64) + np.asarray(grid.offset)
    finite = np.isfinite(q).all(axis=1)
    with np.errstate(invalid="ignore"):
        idx = np.floor(q / grid.resolution)
        valid = finite & (q >= 0).all(axis=1) & (q < np.asarray(grid.extent)).all(axis=1)
        valid &= (idx < np.asarray(grid.shape)).all(axis=1)
    nx, ny, _ = grid.shape
    iv = idx[valid].astype(np.int64)
    keys, inverse = np.unique(iv[:, 0] + iv[:, 1] * nx + iv[:, 2] * nx * ny, return_inverse=True)
    m = keys.shape[0]
    point2voxel = np.full(n, -1, np.int64)
    point2voxel[valid] = inverse
    counts = np.bincount(inverse, minlength=m)
    r = q[valid] - grid.resolution * np.floor(q[valid] / grid.resolution)
    offsets = np.zeros((m, 3))
    np.add.at(offsets, inverse, r - 0.5 * grid.resolution)
    feats = np.zeros((m, points.shape[1] - 3))
    np.add.at(feats, inverse, points[valid, 3:].astype(np.float64))
    out = {
        "keys": keys,
        "coords": np.stack([keys % nx, keys // nx % ny, keys // (nx * ny)], axis=1),
        "point2voxel": point2voxel,
        "counts": counts,
        "offsets": offsets / np.maximum(counts, 1)[:, None],
        "features": feats / np.maximum(counts, 1)[:, None],
        "n_nonfinite": int((~finite).sum()),
        "n_outside": int((finite & ~valid).sum()),
        "labels": None,
    }
    if tags is not None:
        r2 = r[:, 0] * r[:, 0] + r[:, 1] * r[:, 1] + r[:, 2] * r[:, 2]
        vtags = tags[valid]
        labels = np.empty(m, np.int64)
        for v in range(m):
            members = np.flatnonzero(inverse == v)          # ascending point index
            if (vtags[members] == ROAD_LINE).any():
                labels[v] = ROAD_LINE
            else:
                labels[v] = vtags[members[np.argmin(r2[members])]]   # argmin: first minimum
        out["labels"] = labels
    return out


def assert_matches_reference(vox, ref) -> None:
    assert vox.keys.dtype == np.int64 and vox.coords.dtype == np.int32
    assert vox.point2voxel.dtype == np.int64 and vox.counts.dtype == np.int32
    assert vox.features.dtype == np.float32 and vox.offsets.dtype == np.float32
    np.testing.assert_array_equal(vox.keys, ref["keys"])
    np.testing.assert_array_equal(vox.coords, ref["coords"])
    np.testing.assert_array_equal(vox.point2voxel, ref["point2voxel"])
    np.testing.assert_array_equal(vox.counts, ref["counts"])
    np.testing.assert_allclose(vox.offsets, ref["offsets"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(vox.features, ref["features"], rtol=1e-6, atol=1e-6)
    assert (vox.n_nonfinite, vox.n_outside) == (ref["n_nonfinite"], ref["n_outside"])
    if ref["labels"] is None:
        assert vox.labels is None
    else:
        assert vox.labels.dtype == np.int32
        np.testing.assert_array_equal(vox.labels, ref["labels"])


# --- strategies -------------------------------------------------------------------------
def axis_values(grid: VoxelGrid, axis: int) -> st.SearchStrategy:
    """Grid-frame coordinates along one axis, heavy on the places where rules bite."""
    lo, ext, res = -grid.offset[axis], grid.extent[axis], grid.resolution
    hi = lo + ext
    specials = [lo, hi, np.nextafter(hi, -np.inf), np.nextafter(lo, -np.inf), np.nextafter(lo, np.inf),
                -0.0, 0.0, np.nan, np.inf, -np.inf, 1e30, -1e30]
    # voxel faces and quarter points: exact ties in |r|^2 and points on faces
    lattice = [lo + k * res / 4 for k in range(int(round(ext / res)) * 4 + 1)]
    return st.one_of(
        st.sampled_from(specials),
        st.sampled_from(lattice),
        st.floats(lo - 0.3, hi + 0.3, allow_nan=False),
    )


@st.composite
def clouds(draw, grid: VoxelGrid, max_points: int = 60):
    n = draw(st.integers(0, max_points))
    c = draw(st.integers(0, 2))
    cols = [draw(st.lists(axis_values(grid, a), min_size=n, max_size=n)) for a in range(3)]
    feats = draw(st.lists(st.lists(st.floats(-10, 10), min_size=c, max_size=c), min_size=n, max_size=n))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    points = np.concatenate([np.array(cols, np.float64).T.reshape(n, 3),
                             np.array(feats, np.float64).reshape(n, c)], axis=1).astype(dtype)
    tags = np.array(draw(st.lists(st.sampled_from([1, 2, 7, ROAD_LINE, 29]), min_size=n, max_size=n)),
                    np.int32)
    return points, (tags if draw(st.booleans()) else None)


# --- properties ---------------------------------------------------------------------------
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clouds(SMALL))
def test_matches_reference_small_grid(cloud):
    points, tags = cloud
    assert_matches_reference(voxelize(points, SMALL, tags), reference(points, SMALL, tags))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clouds(FINE, max_points=120))
def test_matches_reference_0_1m_grid(cloud):
    points, tags = cloud
    assert_matches_reference(voxelize(points, FINE, tags), reference(points, FINE, tags))


@settings(max_examples=60, deadline=None)
@given(clouds(SMALL))
def test_every_kept_point_lies_in_its_voxel(cloud):
    points, _ = cloud
    vox = voxelize(points, SMALL)
    kept = vox.point2voxel >= 0
    q = points[kept, :3].astype(np.float64) + np.asarray(SMALL.offset)
    corner = vox.coords[vox.point2voxel[kept]] * SMALL.resolution
    assert np.all(corner <= q) and np.all(q < corner + SMALL.resolution)
    assert np.all(np.diff(vox.keys) > 0)
    assert vox.counts.sum() == kept.sum() == points.shape[0] - vox.n_nonfinite - vox.n_outside


def test_random_lidar_sized_cloud_matches_reference():
    rng = np.random.default_rng(3)
    points = np.concatenate([rng.normal(0, 60, (20000, 3)), rng.uniform(0, 1, (20000, 1))], axis=1)
    points = points.astype(np.float32)
    tags = rng.integers(0, 30, 20000).astype(np.int32)
    assert_matches_reference(voxelize(points, VoxelGrid(), tags), reference(points, VoxelGrid(), tags))


# --- hand-made edges ----------------------------------------------------------------------
def test_anovox_grid_bounds():
    """q = 0 is in, q = extent is out, the float just below the extent is in the last voxel."""
    below_x = np.nextafter(np.float32(250), np.float32(0))
    points = np.array([
        [-250.0, -250.0, -16.0],      # q = (0, 0, 0): voxel (0, 0, 0)
        [250.0, 0.0, 0.0],            # q_x = 500 = extent: outside
        [below_x, 0.0, 0.0],          # q_x just below 500: ix 999
        [0.0, 0.0, 16.0],             # q_z = 32: outside
        [0.0, 0.0, np.nextafter(np.float32(16), np.float32(0))],   # iz 63
        [-250.00002, 0.0, 0.0],       # just below 0: outside
        [-0.0, -0.0, -0.0],           # q = offset: voxel (500, 500, 32)
    ], np.float32)
    vox = voxelize(points, VoxelGrid())
    p2v = vox.point2voxel
    assert [p2v[i] >= 0 for i in range(7)] == [True, False, True, False, True, False, True]
    assert vox.n_outside == 3 and vox.n_nonfinite == 0
    assert vox.coords[p2v[0]].tolist() == [0, 0, 0]
    assert vox.coords[p2v[2]].tolist() == [999, 500, 32]
    assert vox.coords[p2v[4]].tolist() == [500, 500, 63]
    assert vox.coords[p2v[6]].tolist() == [500, 500, 32]


def test_negative_zero_on_a_zero_offset_grid():
    grid = VoxelGrid(0.5, (2, 2, 2), (0.0, 0.0, 0.0))
    vox = voxelize(np.array([[-0.0, -0.0, -0.0], [0.0, 0.0, 0.0]]), grid)
    assert vox.coords.tolist() == [[0, 0, 0]] and vox.counts.tolist() == [2]


def test_fine_grid_rounding_guard():
    """floor(q / r) can round up to the shape for q just below the extent: with r = 0.1 and 17
    voxels, q = nextafter(1.7000000000000002, 0) = 1.7 is inside the box but 1.7 / 0.1 is
    exactly 17.0. Such points are dropped (`grid.index` does the same), never given index 17."""
    grid = VoxelGrid(0.1, (17, 17, 17), (0.0, 0.0, 0.0))
    q = np.nextafter(grid.extent[0], 0.0)
    assert q < grid.extent[0] and np.floor(q / grid.resolution) == 17     # the case is real
    points = np.array([[q, 0.05, 0.05], [1.65, 0.05, 0.05]])
    vox = voxelize(points, grid)
    idx, valid = grid.index(points)
    assert valid.tolist() == [False, True] and vox.point2voxel.tolist() == [-1, 0]
    assert vox.coords.tolist() == [[16, 0, 0]] == idx[1:].tolist()


def test_nonfinite_points_are_dropped_and_counted():
    points = np.array([
        [np.nan, 0, 0, 1], [0, np.inf, 0, 1], [0, 0, -np.inf, 1],
        [np.nan, 1e9, 0, 1],          # not finite takes precedence over outside
        [1e9, 0, 0, 1],               # outside
        [0, 0, 0, 5],                 # kept
    ], np.float32)
    vox = voxelize(points, VoxelGrid())
    assert vox.point2voxel.tolist() == [-1, -1, -1, -1, -1, 0]
    assert (vox.n_nonfinite, vox.n_outside) == (4, 1)
    assert vox.features.tolist() == [[5.0]]


def test_all_points_invalid_and_no_points():
    for points in (np.full((5, 4), np.nan, np.float32), np.zeros((0, 4), np.float32)):
        vox = voxelize(points, VoxelGrid(), np.zeros(points.shape[0], np.int32))
        assert len(vox) == 0 and vox.coords.shape == (0, 3) and vox.features.shape == (0, 1)
        assert vox.labels.shape == (0,) and vox.point2voxel.tolist() == [-1] * points.shape[0]
        assert vox.n_nonfinite == points.shape[0]


def test_many_points_in_one_voxel():
    rng = np.random.default_rng(0)
    n = 5000
    xyz = rng.uniform(0.01, 0.49, (n, 3))
    inten = rng.uniform(0, 1, (n, 1))
    vox = voxelize(np.concatenate([xyz, inten], axis=1), VoxelGrid(0.5, (2, 2, 2), (0.0, 0.0, 0.0)))
    assert len(vox) == 1 and vox.counts.tolist() == [n] and (vox.point2voxel == 0).all()
    np.testing.assert_allclose(vox.features[0], inten.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(vox.offsets[0], xyz.mean(axis=0) - 0.25, rtol=1e-5, atol=1e-7)


def test_feature_and_offset_means_by_hand():
    grid = VoxelGrid(0.5, (2, 2, 2), (0.0, 0.0, 0.0))
    points = np.array([[0.1, 0.0, 0.25, 1.0, 10.0],
                       [0.3, 0.5, 0.25, 3.0, 20.0]])
    vox = voxelize(points, grid)
    assert vox.coords.tolist() == [[0, 0, 0], [0, 1, 0]]
    assert vox.features.tolist() == [[1.0, 10.0], [3.0, 20.0]]
    np.testing.assert_allclose(vox.offsets, [[-0.15, -0.25, 0.0], [0.05, -0.25, 0.0]], atol=1e-7)
    vox = voxelize(np.array([[0.1, 0.1, 0.1, 1.0], [0.2, 0.3, 0.4, 4.0]]), grid)
    assert vox.features.tolist() == [[2.5]] and vox.counts.tolist() == [2]
    np.testing.assert_allclose(vox.offsets[0], [-0.1, -0.05, 0.0], atol=1e-7)


def test_label_is_tag_of_point_nearest_the_minimum_corner():
    grid = VoxelGrid(1.0, (2, 2, 2), (0.0, 0.0, 0.0))
    points = np.array([[0.9, 0.9, 0.9], [0.2, 0.1, 0.0], [0.5, 0.5, 0.5]])
    vox = voxelize(points, grid, np.array([3, 9, 14], np.int32))
    assert vox.labels.tolist() == [9]          # nearest the corner, not the lowest index


def test_ties_in_distance_go_to_the_lowest_point_index():
    grid = VoxelGrid(1.0, (2, 2, 2), (0.0, 0.0, 0.0))
    # |r|^2 of (0.25, 0.5, 0) and (0.5, 0.25, 0) are equal in float64 (addition commutes)
    a, b, far = [0.25, 0.5, 0.0], [0.5, 0.25, 0.0], [0.9, 0.9, 0.9]
    for order, tags, want in [((far, a, b), [1, 5, 7], 5), ((far, b, a), [1, 7, 5], 7),
                              ((a, a, a), [8, 2, 6], 8)]:
        vox = voxelize(np.array(order), grid, np.array(tags, np.int32))
        assert vox.labels.tolist() == [want]


def test_road_line_wins_whatever_its_distance():
    grid = VoxelGrid(1.0, (2, 2, 2), (0.0, 0.0, 0.0))
    points = np.array([[0.0, 0.0, 0.0], [0.99, 0.99, 0.99], [1.5, 0.5, 0.5]])
    vox = voxelize(points, grid, np.array([1, ROAD_LINE, 2], np.int32))
    assert vox.labels.tolist() == [ROAD_LINE, 2]


def test_torch_cpu_tensor_gives_the_numpy_result():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    points = rng.normal(0, 5, (500, 4)).astype(np.float32)
    a = voxelize(points)
    b = voxelize(torch.from_numpy(points))
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.point2voxel, b.point2voxel)


@pytest.mark.parametrize("points, labels, match", [
    (np.zeros((4, 2)), None, r"\(N, 3\+C\)"),
    (np.zeros(4), None, r"\(N, 3\+C\)"),
    (np.zeros((4, 3)), np.zeros(3, np.int32), "labels must be integer of shape \\(4,\\), got int32 of shape \\(3,\\)"),
    ([[0.0, 0.0, 0.0]], None, "numpy array or torch tensor"),
])
def test_bad_input_raises_project_error(points, labels, match):
    with pytest.raises(SparseADError, match=match):
        voxelize(points, VoxelGrid(), labels)


def test_bench_smoke(tmp_path):
    """The benchmark checks both methods agree before timing, and writes its JSON."""
    import json

    from sparse_ad.bench import bench_voxelize, format_table, lidar_cloud

    np.testing.assert_array_equal(lidar_cloud(3000, seed=1), lidar_cloud(3000, seed=1))
    report = bench_voxelize(sizes=(3000,), resolutions=(0.5, 0.1), device="cpu", repeats=1,
                            out_json=tmp_path / "bench.json")
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["results"] == report["results"] and len(report["results"]) == 4
    assert {r["voxels"] for r in report["results"][:2]} == {report["results"][0]["voxels"]}
    assert "sparse_ad numba" in format_table(report["results"])
    with pytest.raises(SparseADError, match="device must be"):
        bench_voxelize(device="tpu")


def test_bench_refuses_to_time_methods_that_disagree(monkeypatch):
    from sparse_ad import bench

    real = bench.numpy_reference

    def off_by_one(points, grid):   # a reference that puts the first point in another voxel
        keys, p2v = real(points, grid)
        keys = keys.copy()
        keys[p2v[0]] += 1
        return keys, p2v

    monkeypatch.setattr(bench, "numpy_reference", off_by_one)
    with pytest.raises(SparseADError, match="disagree on 3000 points at 0.5 m; not timing a wrong result"):
        bench.bench_voxelize(sizes=(3000,), resolutions=(0.5,), device="cpu", repeats=1)


def test_entry_point_checks_and_converts_inputs_like_the_cuda_path():
    """Labels must be (N,) integers on both paths; other numeric points become float32;
    CPU torch tensors (with grad, other dtypes, numpy labels) work as on CUDA."""
    import torch

    from sparse_ad.errors import SparseADError
    from sparse_ad.voxelize import voxelize

    p = np.random.default_rng(0).uniform(-5, 5, (100, 4))
    ref = voxelize(p.astype(np.float32), labels=np.arange(100))
    for bad, match in [(np.full(100, 24.7), r"labels must be integer of shape \(100,\), got float64"),
                       (np.zeros((100, 1), np.int32), r"got int32 of shape \(100, 1\)"),
                       ([1] * 100, "got list")]:
        with pytest.raises(SparseADError, match=match):
            voxelize(p, labels=bad)
    with pytest.raises(SparseADError, match="numeric points"):
        voxelize(p.astype(object))
    half = voxelize(p.astype(np.float16), labels=np.arange(100, dtype=np.uint16))
    assert half.features.dtype == np.float32 and len(half.coords) > 90   # float16 may merge a few voxels
    for points, labels in [(torch.tensor(p, dtype=torch.float32, requires_grad=True), torch.arange(100)),
                           (torch.tensor(p, dtype=torch.float32), np.arange(100))]:
        got = voxelize(points, labels=labels)
        assert np.array_equal(got.coords, ref.coords) and np.array_equal(got.labels, ref.labels)
