"""Several sweeps per input (`data.sweeps`): pose algebra, registration on a synthetic split
with a moving ego, the lag feature, the dataset path and the errors a user can cause."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from sparse_ad.alignment import check_alignment
from sparse_ad.config import TransformConfig, load_config
from sparse_ad.data.anovox import FrameRef, load_frame, open_split
from sparse_ad.data.batch import collate, voxelize_batch
from sparse_ad.data.dataset import FrameDataset
from sparse_ad.data.labels import GroundTruth, lookup_tags
from sparse_ad.data.sweeps import earlier_frames, now_from_then, sensor_pose, stacked_grid_points
from sparse_ad.engine.evaluate import evaluate_checkpoint, evaluate_predictions
from sparse_ad.engine.train import train
from sparse_ad.errors import ConfigError, SparseADError
from sparse_ad.export import predict_split
from sparse_ad.grid import VoxelGrid
from sparse_ad.models.spunet import input_features, voxel_features
from sparse_ad.synth import write_split
from sparse_ad.voxelize import voxelize

GRID = VoxelGrid()
ANOVOX = {"location_sign": -1.0, "negate_rotation": True, "flip_y": False}
COMPACT_TAGS = (6, 9)    # poles and trees: far apart, so they only line up when registered
F = np.diag([1.0, -1.0, 1.0, 1.0])


def _carla_pose(yaw_deg: float, x: float, y: float, z: float) -> np.ndarray:
    """A world-from-sensor matrix in CARLA's left-handed frame (yaw about z)."""
    a = np.deg2rad(yaw_deg)
    m = np.eye(4)
    m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    m[:3, 3] = (x, y, z)
    return m


def test_now_from_then_brings_a_static_point_to_where_the_current_sweep_sees_it():
    world = np.array([31.0, -7.5, 0.4, 1.0])                 # CARLA (left-handed) world point
    then, now = _carla_pose(10.0, 2.0, 1.0, 1.8), _carla_pose(25.0, 9.0, 3.5, 1.8)
    seen_then = F @ np.linalg.solve(then, world)              # stored: CARLA's y negated
    seen_now = F @ np.linalg.solve(now, world)
    np.testing.assert_allclose(now_from_then(now, then) @ seen_then, seen_now, atol=1e-12)
    # a release that kept CARLA's y (transform.flip_y=true) stores the point unflipped
    np.testing.assert_allclose(now_from_then(now, then, y_negated=False) @ np.linalg.solve(then, world),
                               np.linalg.solve(now, world), atol=1e-12)
    assert not np.allclose(now_from_then(now, then) @ seen_then, seen_then[:4], atol=1.0)


@pytest.fixture(scope="module")
def moving(tmp_path_factory):
    """One anomaly-free scenario of 4 frames from the synthetic writer: the ego drives
    6-11 m/s and frames are 0.2 s apart, so sweeps differ by 1-2 m."""
    root = tmp_path_factory.mktemp("moving")
    write_split(root, scenarios=1, frames=4, seed=3, anomaly_share=0.0, progress=False, points_per_sweep=20000)
    return root


def _gt_share(points_grid: np.ndarray, gt: GroundTruth) -> float:
    return float((lookup_tags(GRID.point_keys(points_grid), gt) >= 0).mean())


def test_earlier_sweeps_land_on_the_current_ground_truth(moving):
    split = open_split(moving, "SEMANTIC-LIDAR")
    sc = split.scenarios[0]
    ref = FrameRef(sc, sc.frames[-1])
    assert earlier_frames(ref, 2) == [sc.frames[-2], sc.frames[-3]]
    gt = GroundTruth.from_rows(load_frame(ref, "SEMANTIC-LIDAR").gt, GRID, "gt")
    pts = stacked_grid_points(ref, "SEMANTIC-LIDAR", 3, ANOVOX)
    assert set(np.unique(pts[:, 4])) == {0.0, 0.5, 1.0}
    oldest = pts[pts[:, 4] == 1.0]
    oldest = oldest[np.isin(np.rint(oldest[:, 3]), COMPACT_TAGS)]
    assert len(oldest) > 50
    registered = _gt_share(oldest[:, :3], gt)
    raw = load_frame(FrameRef(sc, sc.frames[-3]), "SEMANTIC-LIDAR", with_gt=False)
    raw_pts = raw.grid_points(**ANOVOX)
    unmoved = _gt_share(raw_pts[np.isin(np.rint(raw_pts[:, 3]), COMPACT_TAGS), :3], gt)
    shifted = max(_gt_share(oldest[:, :3] + d, gt) for d in ([0.75, 0, 0], [-0.75, 0, 0], [0, 0.75, 0]))
    assert registered > 0.3 and registered > 2 * unmoved and registered > shifted + 0.05


def test_the_dataset_stacks_sweeps_with_their_lag_and_labels_them_all(tiny_split):
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "data.sweeps=3", "model.in_channels=7",
                                            "augment.enabled=false"])
    refs = open_split(tiny_split).frames
    ds = FrameDataset(refs, cfg, train=False)
    first, third = ds[0], ds[2]                  # frames 100 and 102 of scenario 0
    assert first.points.shape[1] == 5 and set(first.points[:, 4]) == {0.0}
    lags, counts = np.unique(third.points[:, 4], return_counts=True)
    assert list(lags) == [0.0, 0.5, 1.0] and len(third.points) == counts.sum() == len(third.point_targets)
    # identity poses in the hand-written split: an earlier sweep is its own grid transform
    older = load_frame(refs[0], "LIDAR", with_gt=False).grid_points(**ANOVOX)
    np.testing.assert_allclose(third.points[third.points[:, 4] == 1.0, :4], older)
    batch = voxelize_batch(collate([third]), GRID, __import__("torch").device("cpu"))
    assert batch.features.shape[1] == len(input_features(3)) == 7
    assert batch.features[:, 6].min() >= 0 and batch.features[:, 6].max() <= 1
    single = voxelize_batch(collate([FrameDataset(refs, load_config(
        "configs/demo.yaml", [f"data.root={tiny_split}", "augment.enabled=false"]), train=False)[2]]),
        GRID, __import__("torch").device("cpu"))
    assert single.features.shape[1] == 6 and int(single.targets.sum()) > 0
    # the targets still come from the current frame's ground truth
    assert int(batch.targets[batch.valid].sum()) == int(single.targets[single.valid].sum())


def test_voxel_features_append_the_mean_lag():
    pts = np.array([[1.1, 1.1, 1.1, 0.2, 0.0], [1.2, 1.2, 1.2, 0.4, 1.0], [3.1, 3.1, 3.1, 0.6, 0.25]])
    vox = voxelize(pts, GRID)
    f = voxel_features(vox, GRID, columns=2)
    assert f.shape == (2, 7)
    first = vox.point2voxel[0]   # the voxel of the first two points: lags 0 and 1 average to 0.5
    np.testing.assert_allclose(f[first, [0, 6]], [0.3, 0.5], rtol=1e-6)
    np.testing.assert_allclose(f[1 - first, [0, 6]], [0.6, 0.25], rtol=1e-6)
    assert voxel_features(vox, GRID).shape == (2, 6)


def test_sweep_settings_that_cannot_work_are_refused_with_the_fix(tiny_split):
    refs = open_split(tiny_split).frames
    with pytest.raises(ConfigError, match=r"set model.in_channels=7"):
        FrameDataset(refs, load_config(None, [f"data.root={tiny_split}", "data.sweeps=2"]), train=False)
    with pytest.raises(ConfigError, match=r"set model.in_channels=6"):
        FrameDataset(refs, load_config(None, [f"data.root={tiny_split}", "model.in_channels=7"]), train=False)
    with pytest.raises(ConfigError, match=r"data.sweeps: expected 1..10"):
        FrameDataset(refs, load_config(None, ["data.sweeps=0"]), train=False)

    sc = open_split(tiny_split).scenarios[0]      # a fresh copy per test: break it
    ref = FrameRef(sc, sc.frames[1])
    action = sc.action_file(sc.frames[0])
    action.unlink()
    with pytest.raises(SparseADError, match=r"ACTION_100\.csv: missing; .*set data.sweeps=1"):
        stacked_grid_points(ref, "LIDAR", 2, ANOVOX)
    action.write_text("speed ; 5.0\n")
    with pytest.raises(SparseADError, match=r"has no 'lidar transformation matrix'"):
        sensor_pose(sc, sc.frames[0])
    action.write_text(f"lidar transformation matrix ; {np.zeros((4, 4)).tolist()}\n")
    with pytest.raises(SparseADError, match=r"not a finite rigid transform"):
        stacked_grid_points(ref, "LIDAR", 2, ANOVOX)
    # the first frame has no earlier sweep, so it needs no pose at all
    assert stacked_grid_points(FrameRef(sc, sc.frames[0]), "LIDAR", 2, ANOVOX).shape[1] == 5


def test_earlier_sweeps_need_points_and_a_pose_not_ground_truth(tiny_split):
    """A frame without VOXEL_GRID still gives its sweep (so eval and predict stack the same
    ones), and one without ACTION is passed over instead of breaking the frames after it."""
    folder = open_split(tiny_split).scenarios[0].path
    (folder / "VOXEL_GRID" / "VOXEL_GRID_101.npy").unlink()
    for need_gt in (True, False):
        sc = open_split(tiny_split, need_gt=need_gt).scenarios[0]
        assert sc.frames == ([100, 102] if need_gt else [100, 101, 102])
        assert earlier_frames(FrameRef(sc, 102), 2) == [101, 100]
    (folder / "ACTION" / "ACTION_101.csv").unlink()
    sc = open_split(tiny_split, need_gt=False).scenarios[0]
    assert earlier_frames(FrameRef(sc, 102), 2) == [100]
    assert stacked_grid_points(FrameRef(sc, 102), "LIDAR", 3, ANOVOX)[:, 4].max() == 0.5   # lag 1/2: frame 100
    with pytest.raises(SparseADError, match=r"ACTION_101\.csv: missing"):   # its own pose is needed
        stacked_grid_points(FrameRef(sc, 101), "LIDAR", 3, ANOVOX)


def test_several_lidars_are_refused(tiny_split):
    sc = open_split(tiny_split).scenarios[0]
    sc.sensors.append(sc.sensors_of("LIDAR")[0])
    with pytest.raises(SparseADError, match=r"exactly one LIDAR per scenario .*found 2; set data.sweeps=1"):
        stacked_grid_points(FrameRef(sc, sc.frames[1]), "LIDAR", 2, ANOVOX)
    cfg = load_config(None, [f"data.root={tiny_split}", "data.sweeps=2", "model.in_channels=7"])
    with pytest.raises(ConfigError, match=r"exactly one LIDAR per scenario .*found 2"):   # before any frame loads
        FrameDataset([FrameRef(sc, f) for f in sc.frames], cfg, train=True)


def test_check_alignment_says_whether_the_poses_register(moving, tmp_path):
    _, right = check_alignment(moving, GRID, TransformConfig(), frames=4, progress=False)
    assert right.frames == 3 and right.registers and right.registered > 1.5 * max(right.backwards, right.twice)
    assert "the ACTION poses register them" in right.message()
    # the same files with the poses of the frames in reverse order: the ego seems to drive backwards
    shutil.copytree(moving, tmp_path / "split")
    sc = open_split(tmp_path / "split").scenarios[0]
    texts = [sc.action_file(f).read_text() for f in sc.frames]
    for f, text in zip(sc.frames, reversed(texts), strict=True):
        sc.action_file(f).write_text(text)
    _, wrong = check_alignment(tmp_path / "split", GRID, TransformConfig(), frames=4, progress=False)
    assert not wrong.registers and wrong.registered < wrong.backwards and "WARNING" in wrong.message()


def test_poses_register_on_a_sparse_scan_where_points_left_in_place_land_better(tmp_path):
    """8k points a sweep against a 0.25 m VOXEL_GRID: the unmoved earlier sweep repeats the
    current scan's sensor-relative pattern and lands on its voxels more often than the
    registered one (which once made the check warn about correct poses); the wrong motions
    (backwards, twice) are the controls."""
    from sparse_ad.ground_truth import regenerate_split

    write_split(tmp_path / "s", scenarios=2, frames=5, seed=0, anomaly_share=0.0, progress=False,
                points_per_sweep=8000)
    fine = GRID.with_resolution(0.25)
    regenerate_split(tmp_path / "s", tmp_path / "fine", fine, progress=False)
    _, sweeps = check_alignment(tmp_path / "fine", fine, TransformConfig(), frames=0, progress=False)
    assert sweeps.frames >= 6 and sweeps.unregistered > sweeps.registered   # the trap this guards against
    assert sweeps.registers and "the ACTION poses register them" in sweeps.message()


def test_train_predict_and_eval_with_three_sweeps(tiny_split, tmp_path, monkeypatch):
    """The checkpoint remembers data.sweeps: predict and eval stack the same sweeps."""
    monkeypatch.setenv("SPARSE_AD_NO_PROGRESS", "1")
    cfg = load_config("configs/demo.yaml", [f"data.root={tiny_split}", "data.sweeps=3", "model.in_channels=7",
                                            "train.epochs=1", "data.num_workers=0", "model.channels=[8,16]",
                                            "train.batch_size=2", "data.val_fraction=0.5", "model.test_views=1"])
    train(cfg, tmp_path / "run")
    # the last frame of an anomaly scenario: its own sweep misses the object, its earlier ones
    # (same place: identity poses) do not — "anomalies only" goes by the current sweep alone
    lidar = sorted(next(tiny_split.glob("Scenario_*/LIDAR*")).glob("*.npy"))[-1]
    pts = np.load(lidar)
    np.save(lidar, pts[~((np.abs(pts[:, 0] - 8.75) < 1.5) & (np.abs(pts[:, 1]) < 1.5))])
    ev = evaluate_checkpoint(tmp_path / "run" / "best.pt", tmp_path / "eval", all_frames=True, progress=False)
    assert ev["frames"] == 12 and ev["anomalies_only"]["anomaly_voxels"] > 0
    assert predict_split(tmp_path / "run" / "best.pt", tiny_split, tmp_path / "preds", progress=False) == 12
    ep = evaluate_predictions(tmp_path / "preds", tiny_split, tmp_path / "ep.json", cfg, threshold=ev["threshold"],
                              progress=False)
    assert ep["anomaly_frames"] == ev["anomaly_frames"] == 5
    refs = [r for r in open_split(tiny_split).frames if r.frame == int(lidar.stem.rsplit("_", 1)[1])]
    sample = FrameDataset(refs, cfg, train=False)[0]       # what validation and frame labels go by
    assert (sample.point_targets == 1).any() and not sample.current_sees_anomaly   # not in "anomalies only"
    assert sample.lidar_sees_anomaly   # but its input shows the object: frame label 1 for training
    assert ep["anomalies_only"]["aupr"] == pytest.approx(ev["anomalies_only"]["aupr"], abs=1e-7)


def test_the_reader_benchmark_reads_with_the_command_line_overrides(tiny_split):
    from sparse_ad.bench_model import bench_reader

    one = bench_reader(str(tiny_split), frames=3, config="configs/demo.yaml")
    three = bench_reader(str(tiny_split), frames=3, config="configs/demo.yaml",
                         overrides=["data.sweeps=3", "model.in_channels=7"])
    assert three["points_per_frame"] > 1.5 * one["points_per_frame"]   # frames 0, 1, 2: 1 + 2 + 3 sweeps
