import numpy as np
import pytest
import torch

from sparse_ad.data.labels import GroundTruth, target_table, voxel_targets
from sparse_ad.errors import ConfigError, SparseADError
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


def test_frame_label_is_what_the_lidar_sees_not_what_the_gt_holds(tiny_split):
    """An anomaly voxel only the camera saw (no LiDAR point in it) does not make the frame a
    positive bag for MIL or the scene head: nothing in the input shows it."""

    from sparse_ad.config import load_config
    from sparse_ad.data.anovox import open_split
    from sparse_ad.data.batch import collate, voxelize_batch
    from sparse_ad.data.dataset import FrameDataset

    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}"])
    refs = [r for r in open_split(tiny_split).frames if r.scenario.id.startswith("00000002")][:1]
    gt_file = refs[0].scenario.voxel_grid_file(refs[0].frame)
    rows = np.load(gt_file)
    np.save(gt_file, np.concatenate([rows, np.array([[999, 999, 63, 29]], np.uint16)]))   # camera-only
    vb = voxelize_batch(collate([FrameDataset(refs, cfg, train=False)[0]]), cfg.grid.build(), torch.device("cpu"))
    assert vb.frame_labels.tolist() == [0.0] and not bool(vb.targets[vb.valid].any())
    anomalous = [r for r in open_split(tiny_split).frames if r.scenario.id.startswith("00000000")][:1]
    vb = voxelize_batch(collate([FrameDataset(anomalous, cfg, train=False)[0]]), cfg.grid.build(),
                        torch.device("cpu"))
    assert vb.frame_labels.tolist() == [1.0]


def test_tags_outside_uint16_are_refused():
    with pytest.raises(ConfigError, match=r"tag\(s\) \[-1\] outside 0..65535"):
        target_table(anomaly_tags=(29, -1))
    with pytest.raises(ConfigError, match=r"\[70000\]"):
        target_table(ignore_tags=(70000,))


def test_semantic_lidar_is_refused_as_model_input(tiny_split):
    """Its 4th column is the semantic tag: as "intensity" it would hand the model the label."""
    from sparse_ad.config import load_config
    from sparse_ad.data.anovox import open_split
    from sparse_ad.data.dataset import FrameDataset

    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "data.sensor=SEMANTIC-LIDAR"])
    with pytest.raises(ConfigError, match="data.sensor=SEMANTIC-LIDAR.*the label; set data.sensor=LIDAR"):
        FrameDataset(open_split(tiny_split, "SEMANTIC-LIDAR").frames, cfg, train=True)
