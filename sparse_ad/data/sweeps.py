"""Several LiDAR sweeps of a scenario as one input (`data.sweeps`).

A single sweep cannot show a temporal anomaly (a lead vehicle braking hard) and sees a far
object with a handful of points; earlier sweeps of the same scenario, brought into the
current sensor frame, add both motion and density. AnoVox records what that takes: each
frame's ACTION csv holds `lidar transformation matrix`, the sensor's world-from-sensor pose
in CARLA's left-handed frame. A stored point has CARLA's y negated (see
../shared/anovox-format.md), so it reaches the world as M @ F @ p with F = diag(1, -1, 1),
and an earlier sweep's point reaches the current sensor frame as

    p_now = F @ inv(M_now) @ M_then @ F @ p_then

after which the sensor → grid transform is the current frame's, so every sweep lands on
the current frame's grid and its ground truth labels them all (`per_point.point_targets`).
A point of an object that moved lands where the object no longer is: usually a voxel the
current ground truth does not hold, whose target is "ignore" and which the AnoVox protocol
does not score. Each point carries its sweep's lag, k / (sweeps - 1) for the k-th earlier
frame with points and a pose (0 for the current one), and the voxel feature is its mean.

One LiDAR per scenario (mono splits): the pose in ACTION is that of one sensor set, so a
split with several sets is refused rather than registered approximately.
`sparse-ad check-alignment` measures on a release's own files whether the poses register.
"""

from __future__ import annotations

import numpy as np

from sparse_ad.data.anovox import FrameRef, Scenario, load_frame
from sparse_ad.data.files import read_kv_csv
from sparse_ad.errors import ConfigError, SparseADError

POSE_KEY = "lidar transformation matrix"
MAX_SWEEPS = 10


def check_sweeps(sweeps: int) -> None:
    """A sweep count the loader can use (more than 10 is seconds of history and 10x the reading)."""
    if not 1 <= sweeps <= MAX_SWEEPS:
        raise ConfigError(f"data.sweeps: expected 1..{MAX_SWEEPS} (1 = the current sweep only), found {sweeps}")


def check_mono(scenario: Scenario, sensor_type: str) -> None:
    """Several sweeps register by ACTION's one pose per frame, which belongs to one sensor set."""
    found = len(scenario.sensors_of(sensor_type))
    if found != 1:
        raise ConfigError(f"{scenario.path}: data.sweeps > 1 needs exactly one {sensor_type} per scenario "
                          f"(a mono split), found {found}; set data.sweeps=1")


def earlier_frames(ref: FrameRef, count: int) -> list[int]:
    """The `count` frames before `ref` in its scenario that have points and a pose
    (`Scenario.sweep_frames`), nearest first (fewer at the start)."""
    frames = ref.scenario.sweep_frames
    i = int(np.searchsorted(frames, ref.frame))
    return [frames[j] for j in range(i - 1, max(i - 1 - count, -1), -1)]


def sensor_pose(scenario: Scenario, frame: int) -> np.ndarray:
    """(4, 4) world-from-sensor of one frame, from its ACTION csv."""
    path = scenario.action_file(frame)
    if not path.exists():
        raise SparseADError(f"{path}: missing; data.sweeps > 1 registers earlier sweeps by the ACTION files' "
                            f"'{POSE_KEY}' (set data.sweeps=1 to use single sweeps)")
    pose = read_kv_csv(path).get(POSE_KEY)
    if pose is None:
        raise SparseADError(f"{path}: has no '{POSE_KEY}'; data.sweeps > 1 needs it (set data.sweeps=1)")
    if not np.isfinite(pose).all() or abs(np.linalg.det(pose[:3, :3])) < 1e-6:
        raise SparseADError(f"{path}: '{POSE_KEY}' is not a finite rigid transform; data.sweeps > 1 needs it "
                            "(set data.sweeps=1)")
    return pose


def now_from_then(pose_now: np.ndarray, pose_then: np.ndarray, y_negated: bool = True) -> np.ndarray:
    """(4, 4) taking a stored point of the earlier sweep into the current stored sensor frame.
    y_negated: the release stored CARLA's y negated (AnoVox; `transform.flip_y=false`)."""
    f = np.diag([1.0, -1.0 if y_negated else 1.0, 1.0, 1.0])
    return f @ np.linalg.solve(pose_now, pose_then) @ f


def moved(xyz: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(N, 3) float64 points through the rigid (4, 4) transform m."""
    return xyz[:, :3].astype(np.float64) @ m[:3, :3].T + m[:3, 3]


def stacked_grid_points(ref: FrameRef, sensor_type: str, sweeps: int, variant: dict,
                        current=None) -> np.ndarray:
    """Grid-frame points of the current sweep and up to `sweeps - 1` earlier ones:
    (N, 5) float64 = x, y, z, 4th column, lag. `current`: the already loaded current Frame."""
    check_sweeps(sweeps)
    check_mono(ref.scenario, sensor_type)
    frame = current if current is not None else load_frame(ref, sensor_type, with_gt=False)
    sensor, points = frame.points[0]
    to_grid = sensor.transform(**variant)
    parts = [_with_lag(to_grid.apply(points), points, 0.0)]
    earlier = earlier_frames(ref, sweeps - 1)
    if earlier:
        pose_now = sensor_pose(ref.scenario, ref.frame)
        y_negated = not variant.get("flip_y", False)
        for k, then in enumerate(earlier, 1):
            old = load_frame(FrameRef(ref.scenario, then), sensor_type, with_gt=False).points[0][1]
            m = now_from_then(pose_now, sensor_pose(ref.scenario, then), y_negated)
            parts.append(_with_lag(to_grid.apply(moved(old, m)), old, k / (sweeps - 1)))
    return np.concatenate(parts, axis=0)


def _with_lag(grid_xyz: np.ndarray, raw: np.ndarray, lag: float) -> np.ndarray:
    out = np.empty((len(grid_xyz), 5), np.float64)
    out[:, :3] = grid_xyz
    out[:, 3] = raw[:, 3]
    out[:, 4] = lag
    return out
