"""Shared fixtures: a tiny hand-written AnoVox-layout split (independent of `synth`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

MONO = "LIDAR(0, 0, 1.8)(0, 0, 0)_1234"
MONO_SEM = "SEMANTIC-LIDAR(0, 0, 1.8)(0, 0, 0)_5678"


def write_scenario(root: Path, sid: str, frames: list[int], anomaly: bool, setup: bool = True,
                   rng: np.random.Generator | None = None) -> Path:
    """A scenario with LIDAR, SEMANTIC-LIDAR, VOXEL_GRID, ANOMALY and ACTION per frame.

    The ground truth is made by the project's own AnoVox rule from the semantic points, so
    LiDAR voxels line up with it exactly; anomaly scenarios put a tag-29 box ahead.
    """
    from sparse_ad.grid import SensorTransform
    from sparse_ad.ground_truth import voxel_grid_rows

    rng = rng or np.random.default_rng(abs(hash(sid)) % 2**32)
    sc = root / f"Scenario_{sid}"
    for name in (MONO, MONO_SEM):
        (sc / name).mkdir(parents=True, exist_ok=True)
    for sub in ("VOXEL_GRID", "ANOMALY", "ACTION"):
        (sc / sub).mkdir(parents=True, exist_ok=True)
    if setup:
        (sc / "sensor_setup.json").write_text(json.dumps({
            MONO: {"sensor_type": "LIDAR", "file_ending": ".npy", "location": [0, 0, 1.8], "rotation": [0, 0, 0],
                   "args": {"range": 100, "channels": 64}, "save_data": True},
            MONO_SEM: {"sensor_type": "SEMANTIC-LIDAR", "file_ending": ".npy", "location": [0, 0, 1.8],
                       "rotation": [0, 0, 0], "args": {}, "save_data": True}}))
    for f in frames:
        n = 3000
        xy = rng.uniform(-30, 30, (n, 2))
        z = np.full(n, -1.8) + rng.normal(0, 0.02, n)
        tags = np.where(np.abs(xy[:, 1]) < 4, 1, 10).astype(np.float32)
        tags[np.abs(xy[:, 1]) < 0.1] = 24
        if anomaly:
            box = rng.uniform([8, -1, -1.8], [9.5, 1, -0.5], (400, 3))
            xy = np.concatenate([xy, box[:, :2]])
            z = np.concatenate([z, box[:, 2]])
            tags = np.concatenate([tags, np.full(400, 29, np.float32)])
        sem = np.stack([xy[:, 0], xy[:, 1], z, tags], 1).astype(np.float32)
        lidar = sem.copy()
        lidar[:, 3] = rng.uniform(0, 1, len(lidar))
        np.save(sc / MONO / f"{MONO}_{f}.npy", lidar)
        np.save(sc / MONO_SEM / f"{MONO_SEM}_{f}.npy", sem)
        np.save(sc / "VOXEL_GRID" / f"VOXEL_GRID_{f}.npy", voxel_grid_rows(sem, SensorTransform((0, 0, 1.8))))
        (sc / "ANOMALY" / f"ANOMALY_{f}.csv").write_text(
            f"frame_id ; {f}\nscenario_id ; {sid}\nanomaly_is_alive ; {anomaly}\n"
            f"semantic_tags ; [29]\nsize ; (1.5, 2.0, 1.3)\nlocation ; (8.7, 0.0, 0.0)\n")
        (sc / "ACTION" / f"ACTION_{f}.csv").write_text(
            f"speed ; 5.0\nlidar transformation matrix ; {np.eye(4).tolist()}\n")
    return sc


def random_voxels(seed: int, shape, per_frame: int, batch_size: int = 1, channels: int = 6):
    """A sparse tensor of `per_frame` distinct random voxels per frame in the box `shape`,
    standard-normal features; deterministic in `seed`."""
    from sparse_ad.models.sparse_tensor import to_sparse_tensor

    rng = np.random.default_rng(seed)
    coords, batch = [], []
    for b in range(batch_size):
        keys = rng.choice(int(np.prod(shape)), per_frame, replace=False)
        coords.append(np.stack(np.unravel_index(keys, shape), axis=1))
        batch.append(np.full(per_frame, b))
    feats = rng.standard_normal((batch_size * per_frame, channels)).astype(np.float32)
    return to_sparse_tensor(feats, np.concatenate(coords), np.concatenate(batch), shape, batch_size)


@pytest.fixture
def tiny_split(tmp_path) -> Path:
    root = tmp_path / "split"
    (root / "Scenario_Configuration_Files").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, anomaly in enumerate([True, True, False, False]):
        write_scenario(root, f"0000000{i}-aaaa", [100 + i, 101 + i, 102 + i], anomaly, rng=rng)
    return root


@pytest.fixture
def randomize_bn():
    """`apply(model, generator)`: non-trivial BN statistics and affine parameters, so that a
    wrong BN fold (or a layer that ignores BN) cannot pass a comparison."""
    import torch

    def apply(model, gen):
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.2)
                m.weight.data.copy_(torch.randn(c, generator=gen) * 0.5 + 1)
                m.bias.data.copy_(torch.randn(c, generator=gen) * 0.5)

    return apply


def stop_flag_set_at_read(n: int):
    """A stand-in for train's `_StopFlag` (SIGINT/SIGTERM) that reads as set from its n-th read on."""

    class Flag:
        reads, signum = 0, None

        def __init__(self, escalate: bool = True):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        @property
        def set(self):
            Flag.reads += 1
            return Flag.reads >= n

    return Flag
