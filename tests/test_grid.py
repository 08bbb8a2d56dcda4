import numpy as np
import pytest

from sparse_ad.errors import ConfigError
from sparse_ad.grid import SensorTransform, VoxelGrid, rotation_matrix


def test_anovox_defaults_and_extent():
    g = VoxelGrid()
    assert g.resolution == 0.5 and g.shape == (1000, 1000, 64) and g.offset == (250.0, 250.0, 16.0)
    assert g.extent == (500.0, 500.0, 32.0)


def test_keys_roundtrip_and_order():
    g = VoxelGrid()
    coords = np.array([[0, 0, 0], [999, 0, 0], [0, 1, 0], [0, 0, 1], [999, 999, 63]])
    keys = g.keys(coords)
    assert keys.tolist() == [0, 999, 1000, 1_000_000, 63_999_999]
    assert np.array_equal(g.decode(keys), coords)


def test_index_bounds_are_half_open():
    g = VoxelGrid()
    pts = np.array([[-250.0, -250.0, -16.0],            # q = 0: first voxel
                    [249.999, 249.999, 15.999],         # last voxel
                    [250.0, 0.0, 0.0],                  # q = 500: outside
                    [-250.0000001, 0.0, 0.0],           # q < 0: outside
                    [np.nan, 0.0, 0.0]])
    idx, valid = g.index(pts)
    assert valid.tolist() == [True, True, False, False, False]
    assert idx[0].tolist() == [0, 0, 0] and idx[1].tolist() == [999, 999, 63]
    assert (idx[2:] == -1).all()
    assert g.point_keys(pts).tolist() == [0, 999 + 999 * 1000 + 63 * 1000 * 1000, -1, -1, -1]


def test_mono_transform_is_exact_subtraction():
    t = SensorTransform((0.0, 0.0, 1.8), (0.0, 0.0, 0.0))
    p = np.array([[1.0, 2.0, 3.0, 0.5]], np.float32)
    out = t.apply(p)
    assert out.dtype == np.float64
    assert out[0, 2] == np.float64(np.float32(3.0)) - 1.8  # bit-exact, as the generator computes it


def test_rotation_convention_negated_then_location_subtracted():
    # R(a, b, c) = Rx(a) Ry(b) Rz(c); the generator applies R(-a, -b, -c), then subtracts location.
    t = SensorTransform((0.0, -1.0, 1.8), (0.0, 0.0, -15.0))
    p = np.array([[10.0, 0.0, 0.0]])
    expected = rotation_matrix((0, 0, 15.0)) @ p[0] - np.array([0.0, -1.0, 1.8])
    assert np.allclose(t.apply(p)[0], expected)
    rz = rotation_matrix((0, 0, 90))
    assert np.allclose(rz @ [1, 0, 0], [0, 1, 0])
    rx = rotation_matrix((90, 0, 0))
    assert np.allclose(rx @ [0, 1, 0], [0, 0, 1])


def test_with_resolution_keeps_the_box():
    g = VoxelGrid().with_resolution(0.1)
    assert g.shape == (5000, 5000, 320) and g.offset == VoxelGrid().offset
    with pytest.raises(ConfigError):
        VoxelGrid().with_resolution(0.3)
