"""CUDA voxelizer kernels against the numba CPU path, bit for bit.

Not collected by the main suite (the name does not start with `test_`):
`test_voxelize_cuda.py` runs this file in a child pytest with NUMBA_ENABLE_CUDASIM=1,
because the simulator must be switched on before numba is first imported. Run it by hand:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -q tests/cudasim_cases.py

On a machine with a GPU it also runs without the variable: the same kernels then run on
the device (numpy arrays are copied in and out), and the torch entry point is tested too.
The simulator runs every CUDA thread as a Python thread, so inputs stay small.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import cuda

from sparse_ad.grid import VoxelGrid
from sparse_ad.tags import ROAD_LINE
from sparse_ad.voxelize import cuda as vcuda
from sparse_ad.voxelize.cpu import voxelize_cpu

pytestmark = pytest.mark.skipif(not (vcuda.SIMULATOR or cuda.is_available()),
                                reason="needs NUMBA_ENABLE_CUDASIM=1 or a CUDA device")

SMALL = VoxelGrid(0.5, (4, 3, 2), (1.0, 0.75, 0.5))          # int32 keys
FINE = VoxelGrid().with_resolution(0.1)                       # 8e9 voxels: int64 keys
FIELDS = ("keys", "coords", "point2voxel", "counts", "features", "offsets", "labels")


def run_device(points, grid, tags=None, backend=None):
    backend = backend or vcuda.NumpyBackend(threads=32)
    return vcuda._voxelize_device(points, tags, grid, backend)


def assert_same(dev, ref) -> None:
    """Every output equal to the CPU's, dtype and bits included."""
    for name in FIELDS:
        a, b = getattr(dev, name), getattr(ref, name)
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), name   # bits, not values
    assert (int(dev.n_nonfinite), int(dev.n_outside)) == (ref.n_nonfinite, ref.n_outside)


def assert_scratch_clean(backend) -> None:
    """After a call the slot buffers are back in their initial state (no memset next time)."""
    sc = backend.scratch
    for name, values in vcuda._Scratch.INIT.items():
        arr = np.asarray(sc.array(name))
        for row, value in enumerate(values):
            if value is not None:
                assert ((arr if len(values) == 1 else arr[row]) == value).all(), (name, row)
    assert not sc.dirty


def messy_cloud(rng, n, grid, c=1, dtype=np.float32):
    """Points over the grid plus NaN/inf, outside points, duplicates and exact ties."""
    lo = -np.asarray(grid.offset)
    hi = lo + np.asarray(grid.extent)
    xyz = rng.uniform(lo - 0.2, hi + 0.2, (n, 3))
    k = n // 8
    xyz[:k] = xyz[k:2 * k]                                  # duplicates: exact r2 ties
    xyz[2 * k, 0] = np.nan
    xyz[2 * k + 1, 1] = np.inf
    xyz[2 * k + 2, 2] = -np.inf
    xyz[2 * k + 3] = hi                                     # exactly on the far faces
    xyz[2 * k + 4] = lo                                     # exactly on the near faces
    points = np.concatenate([xyz, rng.normal(0, 3, (n, c))], axis=1).astype(dtype)
    tags = rng.choice(np.array([1, 2, 9, ROAD_LINE, 29], np.int32), n, p=[.3, .3, .2, .1, .1])
    return points, tags.astype(np.int32)


@pytest.mark.parametrize("grid", [SMALL, FINE], ids=["int32-keys", "int64-keys"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_cpu_on_messy_cloud(grid, dtype):
    rng = np.random.default_rng(7)
    points, tags = messy_cloud(rng, 160, grid if grid is SMALL else SMALL, dtype=dtype)
    backend = vcuda.NumpyBackend(threads=32)
    assert_same(run_device(points, grid, tags, backend), voxelize_cpu(points, grid, tags))
    assert_scratch_clean(backend)


def test_road_lines_and_ties_by_hand():
    grid = VoxelGrid(1.0, (2, 2, 2), (0.0, 0.0, 0.0))
    points = np.array([[0.9, 0.9, 0.9], [0.25, 0.5, 0.0], [0.5, 0.25, 0.0], [0.25, 0.5, 0.0],
                       [1.5, 0.5, 0.5], [1.9, 0.1, 0.1], [1.1, 0.1, 0.1]])
    tags = np.array([1, 5, 7, 3, 2, ROAD_LINE, 4], np.int32)
    dev = run_device(points, grid, tags)
    assert dev.labels.tolist() == [5, ROAD_LINE]       # tie -> lowest index; road line wins
    assert_same(dev, voxelize_cpu(points, grid, tags))


def test_many_points_in_one_voxel_across_blocks():
    """Every thread of every block hits the same slot: CAS losers and shared counters."""
    rng = np.random.default_rng(1)
    points = np.concatenate([rng.uniform(0.01, 0.49, (200, 3)), rng.uniform(0, 1, (200, 2))], axis=1)
    grid = VoxelGrid(0.5, (2, 2, 2), (0.0, 0.0, 0.0))
    tags = rng.integers(0, 5, 200).astype(np.int32)
    dev = run_device(points, grid, tags, vcuda.NumpyBackend(threads=16))
    assert dev.counts.tolist() == [200]
    assert_same(dev, voxelize_cpu(points, grid, tags))


def test_rounding_guard_at_the_far_face():
    """q just below the extent whose floor(q / r) rounds up to the shape (r = 0.1, 17 voxels,
    q = 1.7): dropped as outside, on the device as on the CPU."""
    grid = VoxelGrid(0.1, (17, 17, 17), (0.0, 0.0, 0.0))
    q = np.nextafter(grid.extent[0], 0.0)
    points = np.array([[q, 0.05, 0.05, 1.0], [1.65, 0.05, 0.05, 1.0], [0.05, q, q, 1.0]])
    dev = run_device(points, grid)
    assert dev.point2voxel.tolist() == [-1, 0, -1] and int(dev.n_outside) == 2
    assert_same(dev, voxelize_cpu(points, grid))


@pytest.mark.parametrize("case", ["empty", "all-nan", "all-outside"])
def test_no_voxels(case):
    points = {"empty": np.zeros((0, 4), np.float32),
              "all-nan": np.full((40, 4), np.nan, np.float32),
              "all-outside": np.full((40, 4), 1e6, np.float32)}[case]
    tags = np.zeros(points.shape[0], np.int32)
    backend = vcuda.NumpyBackend()
    dev = run_device(points, VoxelGrid(), tags, backend)
    assert len(dev) == 0 and dev.coords.shape == (0, 3) and dev.features.shape == (0, 1)
    assert (dev.point2voxel == -1).all() and dev.point2voxel.shape == (points.shape[0],)
    assert int(dev.n_nonfinite) == (40 if case == "all-nan" else 0)
    assert int(dev.n_outside) == (40 if case == "all-outside" else 0)
    if points.shape[0]:
        assert_scratch_clean(backend)


def test_scratch_is_reused_and_regrown_across_calls():
    """One backend, calls of growing and shrinking size and feature width, with and without
    labels: every result still equals the CPU's, so nothing leaks from call to call."""
    rng = np.random.default_rng(2)
    backend = vcuda.NumpyBackend(threads=32)
    for n, c, with_tags in [(40, 1, True), (150, 0, False), (30, 3, True), (1500, 1, True), (60, 1, False)]:
        points, tags = messy_cloud(rng, n, SMALL, c=c)
        tags = tags if with_tags else None
        if n > 1000:                                       # keep the simulator fast
            points[:, :3] = np.nan
            points[:100, :3] = rng.uniform(-1, 1, (100, 3))
        assert_same(run_device(points, SMALL, tags, backend), voxelize_cpu(points, SMALL, tags))
        assert_scratch_clean(backend)


def test_recovers_from_a_call_that_stopped_half_way():
    rng = np.random.default_rng(4)
    points, tags = messy_cloud(rng, 64, SMALL)
    backend = vcuda.NumpyBackend()
    run_device(points, SMALL, tags, backend)
    backend.scratch.array("slot64")[vcuda.TABLE, :8] = 12345   # garbage a dead call left
    backend.scratch.array("slot32")[vcuda.COUNT, :8] = 7
    backend.scratch.dirty = True
    assert_same(run_device(points, SMALL, tags, backend), voxelize_cpu(points, SMALL, tags))


def test_strided_input_columns():
    rng = np.random.default_rng(5)
    wide, tags = messy_cloud(rng, 64, SMALL, c=3, dtype=np.float64)
    strided = wide[::2, :5]                                 # a view: every other row, 5 of 6 columns
    assert strided.base is not None and not strided.flags.c_contiguous
    dev = vcuda._voxelize_device(strided, tags[::2], SMALL, vcuda.NumpyBackend())
    assert_same(dev, voxelize_cpu(np.ascontiguousarray(strided), SMALL, tags[::2]))


class TorchOnHostBackend(vcuda.TorchBackend):
    """`TorchBackend` with CPU tensors whose numpy views stand in for numba device views:
    runs the torch side (allocation, fills, torch.sort, scatter_, slicing) under the simulator."""

    threads = 32

    def __init__(self):
        import torch

        self.torch, self.device, self.stream = torch, torch.device("cpu"), 0
        self.scratch = vcuda._Scratch(self)

    def view(self, t):
        return t.numpy() if t.is_contiguous() else np.ascontiguousarray(t.numpy())


def test_torch_backend_logic_on_host_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    backend = TorchOnHostBackend()
    for n, grid in [(120, SMALL), (90, FINE), (0, SMALL)]:
        points, tags = messy_cloud(rng, max(n, 8), SMALL, c=2)
        points, tags = points[:n], tags[:n]
        t = torch.from_numpy(points)
        dev = vcuda._voxelize_device(t, torch.from_numpy(tags), grid, backend)
        assert all(isinstance(getattr(dev, f), torch.Tensor) for f in FIELDS)
        host = type(dev)(**{k: v.numpy() for k, v in vars(dev).items()})
        assert_same(host, voxelize_cpu(points, grid, tags))
    assert not backend.scratch.dirty


@st.composite
def small_clouds(draw):
    n = draw(st.integers(1, 40))
    lattice = [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0]   # SMALL's x faces/quarters
    coord = st.one_of(st.sampled_from(lattice + [-0.0, np.nan, np.inf, 5.0]),
                      st.floats(-1.2, 1.2, allow_nan=False))
    xyz = np.array(draw(st.lists(st.tuples(coord, coord, coord), min_size=n, max_size=n)), np.float64)
    c = draw(st.integers(0, 2))
    feats = np.array(draw(st.lists(st.lists(st.floats(-5, 5), min_size=c, max_size=c),
                                   min_size=n, max_size=n)), np.float64).reshape(n, c)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    tags = np.array(draw(st.lists(st.sampled_from([1, 3, ROAD_LINE]), min_size=n, max_size=n)), np.int32)
    return np.concatenate([xyz, feats], axis=1).astype(dtype), tags if draw(st.booleans()) else None


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(small_clouds())
def test_property_matches_cpu(cloud):
    points, tags = cloud
    assert_same(run_device(points, SMALL, tags, vcuda.NumpyBackend(threads=8)),
                voxelize_cpu(points, SMALL, tags))


@pytest.mark.skipif(vcuda.SIMULATOR or not cuda.is_available(), reason="needs a real CUDA device")
def test_torch_entry_point_on_gpu():  # pragma: no cover - GPU only
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    rng = np.random.default_rng(6)
    points, tags = messy_cloud(rng, 200_000, VoxelGrid())
    points[:190_000, :3] *= 0.1      # dense: ~3 points per voxel, ties and CAS contention; the rest grid-wide
    ref = voxelize_cpu(points, VoxelGrid(), tags)
    assert len(ref.coords) > 60_000 and ref.n_outside > 0 and (ref.labels == ROAD_LINE).any()
    for _ in range(2):                                      # second call: reused scratch
        dev = vcuda.voxelize_cuda(torch.from_numpy(points).cuda(), VoxelGrid(),
                                  torch.from_numpy(tags).cuda())
        host = type(dev)(**{k: (v.cpu().numpy() if hasattr(v, "cpu") else v)
                            for k, v in vars(dev).items()})
        assert_same(host, ref)
