import numpy as np
import pytest
import torch

from sparse_ad.data.labels import GroundTruth, target_table, voxel_targets
from sparse_ad.errors import SparseADError
from sparse_ad.grid import VoxelGrid


def _gt():
    rows = np.array([[5, 5, 5, 29], [1, 1, 1, 1], [2, 2, 2, 214], [3, 3, 3, 100], [4, 4, 4, 7000]], np.uint16)
    return GroundTruth.from_rows(rows, VoxelGrid())


def test_targets_by_key_on_numpy_and_torch():
    g = VoxelGrid()
    gt = _gt()
    lut = target_table()
    coords = np.array([[1, 1, 1], [5, 5, 5], [2, 2, 2], [9, 9, 9], [3, 3, 3], [4, 4, 4]])
    expect = [0, 1, -1, -1, 1, 0]  # normal, anomaly, ignored (ego), absent, anomaly (100), unknown tag = normal
    assert voxel_targets(g.keys(coords), gt, lut).tolist() == expect
    t = voxel_targets(torch.as_tensor(g.keys(coords)), gt.to("cpu"), lut)
    assert t.tolist() == expect


def test_label_sets_are_configurable():
    g = VoxelGrid()
    lut = target_table(anomaly_tags=(1,), ignore_tags=(29,))
    keys = g.keys(np.array([[1, 1, 1], [5, 5, 5]]))
    assert voxel_targets(keys, _gt(), lut).tolist() == [1, -1]
    with pytest.raises(SparseADError, match="both"):
        target_table((29,), (29,))


def test_empty_gt_and_duplicates():
    g = VoxelGrid()
    empty = GroundTruth.from_rows(np.zeros((0, 4), np.uint16), g)
    assert voxel_targets(np.array([0, 5]), empty, target_table()).tolist() == [-1, -1]
    with pytest.raises(SparseADError, match="duplicate"):
        GroundTruth.from_rows(np.array([[1, 1, 1, 1], [1, 1, 1, 2]], np.uint16), g)
    with pytest.raises(SparseADError, match="exceed the grid"):
        GroundTruth.from_rows(np.array([[1000, 1, 1, 1]], np.uint16), g)
