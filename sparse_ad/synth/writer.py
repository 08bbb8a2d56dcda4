"""Write one planned scenario to disk in the AnoVox layout.

A scenario is written into `.partial_Scenario_<uuid>/` (every file atomically) and renamed
to `Scenario_<uuid>/` when complete, replacing an older copy of the same scenario, so a
reader never sees a half-written scenario and a rerun leaves no stale frames behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparse_ad.io import atomic_save_npy, atomic_write_text
from sparse_ad.synth.records import action_record, anomaly_record, format_record
from sparse_ad.synth.scenario import Plan, render_frame
from sparse_ad.synth.sensors import SensorNames, SensorSet
from sparse_ad.tags import DEFAULT_ANOMALY_TAGS

SENSOR_SETUP_FILE = "sensor_setup.json"


@dataclass
class ScenarioStats:
    anomaly_voxels: list[int] = field(default_factory=list)   # per frame
    gt_voxels: list[int] = field(default_factory=list)        # per frame
    lidar_points: list[int] = field(default_factory=list)     # per frame, all sets


def write_scenario(root: Path, plan: Plan, sets: tuple[SensorSet, ...], names: list[SensorNames],
                   setup: dict, points_per_sweep: int, tick: Callable[[], None] = lambda: None) -> ScenarioStats:
    final = root / f"Scenario_{plan.scenario_id}"
    tmp = root / f".partial_Scenario_{plan.scenario_id}"
    if tmp.exists():
        shutil.rmtree(tmp)
    atomic_write_text(tmp / SENSOR_SETUP_FILE, json.dumps(setup))
    anomaly_tags = np.asarray(DEFAULT_ANOMALY_TAGS)
    stats = ScenarioStats()
    for k, frame in enumerate(plan.frame_ids):
        out = render_frame(plan, k, sets, points_per_sweep)
        for n, o in zip(names, out.sets, strict=True):
            atomic_save_npy(tmp / n.lidar / f"{n.lidar}_{frame}.npy", o.lidar)
            atomic_save_npy(tmp / n.semantic / f"{n.semantic}_{frame}.npy", o.semantic)
        atomic_save_npy(tmp / "VOXEL_GRID" / f"VOXEL_GRID_{frame}.npy", out.gt)
        atomic_write_text(tmp / "ACTION" / f"ACTION_{frame}.csv", format_record(action_record(plan, k, sets)))
        if plan.anomaly is not None:   # the generator writes no ANOMALY file without an anomaly actor
            atomic_write_text(tmp / "ANOMALY" / f"ANOMALY_{frame}.csv", format_record(anomaly_record(plan, k)))
        stats.anomaly_voxels.append(int(np.isin(out.gt[:, 3], anomaly_tags).sum()))
        stats.gt_voxels.append(len(out.gt))
        stats.lidar_points.append(sum(len(o.lidar) for o in out.sets))
        tick()
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return stats
