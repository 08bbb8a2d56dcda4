"""Synthetic splits in exactly the AnoVox on-disk layout (`sparse-ad synth`).

    OUT/
      Scenario_Configuration_Files/scenario_config_map_SynthTown.json   (written last)
      Scenario_<uuid>/
        sensor_setup.json
        LIDAR(0, 0, 1.8)(0, 0, 0)_<hash>/LIDAR(0, 0, 1.8)(0, 0, 0)_<hash>_<frame>.npy
        SEMANTIC-LIDAR(0, 0, 1.8)(0, 0, 0)_<hash>/...
        VOXEL_GRID/VOXEL_GRID_<frame>.npy
        ACTION/ACTION_<frame>.csv
        ANOMALY/ANOMALY_<frame>.csv            (anomaly scenarios only, as in AnoVox)

Procedural street scenes (urban, suburban or rural: road, road lines, sidewalks, terrain,
buildings, walls, fences, parked and oncoming cars, a lead van, pedestrians, poles, signs,
trees, the ego body) are ray-cast with AnoVox's LiDAR model: 64 channels from +15 to -25
degrees, 100 m range, `points_per_sweep` shots (default 100k = 1e6 points/s times the
0.1 s tick; 75-90 % return), LIDAR with 0.1 m Gaussian range noise and 2 % dropout,
SEMANTIC-LIDAR noise-free from the same rays. The VOXEL_GRID is built as the generator
builds it: semantic LiDAR plus a back-projected depth + semantic camera (768x512, 90
degrees, every 2nd pixel, to 100 m) of every sensor set, moved to the grid frame by each
set's transform and voxelized with the AnoVox label rule, so it holds more voxels (about
15 % more) than the LiDAR covers. Anomalies (tags 29-34, 100; 0.3-3 m) stand in the ego
lane, hidden behind a lead van for the first frames; with `braking_share` some anomaly
scenarios are AnoVox's temporal kind instead: the lead van brakes suddenly and is tagged 100
while it brakes (see `scenario.py`). Camera PNGs are
not written (the cameras are listed in sensor_setup.json with save_data false). Scenes,
sensors, records: `scene.py`, `anomalies.py`, `sensors.py`, `records.py`; ray casting:
`raycast.py`; files: `writer.py`.

Everything derives from `seed`: the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparse_ad.errors import ConfigError
from sparse_ad.io import atomic_write_text, progress_bar
from sparse_ad.synth.scenario import plan_scenario
from sparse_ad.synth.sensors import DEFAULT_POINTS_PER_SWEEP, SENSOR_SETS, sensor_setup
from sparse_ad.synth.writer import write_scenario

__all__ = ["SplitSummary", "add_synth_args", "plan_split", "run_synth", "write_split"]

CONFIG_FOLDER = "Scenario_Configuration_Files"
CONFIG_FILE = "scenario_config_map_SynthTown.json"
MIN_POINTS_PER_SWEEP = 640


@dataclass
class SplitSummary:
    root: Path
    scenario_ids: list[str]
    frames_per_scenario: int
    anomaly_scenarios: list[str]        # every kind
    anomaly_voxels: int                 # over all frames
    seconds: float
    frame_ids: dict[str, list[int]] = field(default_factory=dict)
    anomaly_frames: dict[str, int] = field(default_factory=dict)   # frames whose GT holds anomaly voxels
    gt_voxels: int = 0                  # over all frames
    lidar_points: int = 0               # over all frames and sensor sets
    points_per_sweep: int = DEFAULT_POINTS_PER_SWEEP
    sensor_sets: str = "mono"
    braking_scenarios: list[str] = field(default_factory=list)   # the sudden-braking ones among them

    def describe(self) -> str:
        n_frames = len(self.scenario_ids) * self.frames_per_scenario
        return (f"{self.root}: {len(self.scenario_ids)} scenarios x {self.frames_per_scenario} frames "
                f"({len(self.anomaly_scenarios)} with an anomaly{self._braking()}, seen in "
                f"{sum(self.anomaly_frames.values())} frames); {self.lidar_points / max(n_frames, 1):.0f} LIDAR "
                f"points and {self.gt_voxels / max(n_frames, 1):.0f} GT voxels per frame, "
                f"{self.anomaly_voxels} anomaly voxels; {self.seconds:.1f} s")

    def _braking(self) -> str:
        return f" ({len(self.braking_scenarios)} sudden braking)" if self.braking_scenarios else ""


def anomaly_mask(scenarios: int, share: float, seed: int, stream: int = 2**32 - 1) -> np.ndarray:
    """Which scenarios get an anomaly: round(share * n) of them (at least one of each kind
    when 0 < share < 1 and n >= 2), picked by a seeded permutation (`stream`: which one)."""
    n = int(round(share * scenarios))
    if scenarios >= 2 and 0.0 < share < 1.0:
        n = min(max(n, 1), scenarios - 1)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))
    mask = np.zeros(scenarios, bool)
    mask[rng.permutation(scenarios)[:n]] = True
    return mask


def braking_mask(anomalous: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Which anomaly scenarios are sudden braking: `share` of them (as `anomaly_mask` picks,
    from a stream of its own, so the static ones of a split without braking stay as they were)."""
    mask = np.zeros(len(anomalous), bool)
    idx = np.flatnonzero(anomalous)
    if len(idx) and share > 0:
        mask[idx[anomaly_mask(len(idx), share, seed, stream=2**32 - 2)]] = True
    return mask


def plan_split(scenarios: int, frames: int, seed: int, anomaly_share: float, braking_share: float = 0.0):
    """The plans of a split's scenarios, in order: which get an anomaly, which of those brake,
    and each scenario drawn from its own seed stream (what `write_split` renders; what an
    analysis re-draws from the split's config to know where things were)."""
    mask = anomaly_mask(scenarios, anomaly_share, seed)
    braking = braking_mask(mask, braking_share, seed)
    for i in range(scenarios):
        yield plan_scenario(np.random.SeedSequence(seed, spawn_key=(i,)), i, frames, bool(mask[i]),
                            "braking" if braking[i] else "static")


def write_split(out: Path, scenarios: int, frames: int, seed: int, anomaly_share: float = 0.6,
                sensor_sets: str = "mono", progress: bool = True,
                points_per_sweep: int | None = None, braking_share: float = 0.0) -> SplitSummary:
    """Write a synthetic split to `out` (created if needed) and return what was written.

    scenarios, frames: how many; seed: non-negative int, the only source of randomness;
    anomaly_share: share of scenarios with an anomaly; sensor_sets: "mono" or "stereo"
    (AnoVox's three-set stereo rig); points_per_sweep: LiDAR shots per sweep (default
    100k); braking_share: share of the anomaly scenarios that are a sudden braking of the
    lead vehicle (AnoVox's temporal anomaly) instead of a static object. A scenario of the
    same seed already in `out` is replaced; other folders are left alone (with a warning when
    they look like scenarios).
    """
    points_per_sweep = DEFAULT_POINTS_PER_SWEEP if points_per_sweep is None else int(points_per_sweep)
    _check(scenarios, frames, seed, anomaly_share, sensor_sets, points_per_sweep, braking_share)
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; pick another output path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{out}: cannot create the output folder ({e.strerror or e}); pick a writable path") from None
    sets = SENSOR_SETS[sensor_sets]
    setup, names = sensor_setup(sets, points_per_sweep, seed)
    summary = SplitSummary(out, [], frames, [], 0, 0.0, points_per_sweep=points_per_sweep, sensor_sets=sensor_sets)
    before = set(_scenario_folders(out))
    plans_meta = []
    with progress_bar(None, progress, total=scenarios * frames, desc="synth", unit="frame") as bar:
        for plan in plan_split(scenarios, frames, seed, anomaly_share, braking_share):
            stats = write_scenario(out, plan, sets, names, setup, points_per_sweep, tick=bar.update)
            sid = plan.scenario_id
            summary.scenario_ids.append(sid)
            summary.frame_ids[sid] = plan.frame_ids
            summary.anomaly_frames[sid] = sum(v > 0 for v in stats.anomaly_voxels)
            summary.anomaly_voxels += sum(stats.anomaly_voxels)
            summary.gt_voxels += sum(stats.gt_voxels)
            summary.lidar_points += sum(stats.lidar_points)
            if plan.anomaly is not None:
                summary.anomaly_scenarios.append(sid)
            if plan.kind == "braking":
                summary.braking_scenarios.append(sid)
            plans_meta.append(_scenario_definition(plan))
    _warn_foreign(out, set(summary.scenario_ids), before)
    config = {"scenario_definition": {"map": "SynthTown", "scenarios": plans_meta},
              "synth": {"seed": seed, "scenarios": scenarios, "frames": frames, "anomaly_share": anomaly_share,
                        "sensor_sets": sensor_sets, "points_per_sweep": points_per_sweep}}
    if braking_share:   # only then, so that splits without braking keep their bytes
        config["synth"]["braking_share"] = braking_share
    atomic_write_text(out / CONFIG_FOLDER / CONFIG_FILE, json.dumps(config, indent=4) + "\n")
    summary.seconds = time.perf_counter() - t0
    return summary


def _scenario_definition(plan) -> dict:
    """The scenario's entry in the generator's config-file format (plus synth details;
    "SUDDEN_BRAKING" is this writer's name for the temporal kind)."""
    a = plan.anomaly
    anomaly_config = ({"anomalytype": "SUDDEN_BRAKING" if plan.kind == "braking" else "STATIC",
                       "anomaly_bp_name": a.type_id, "distance_to_waypoint": 0,
                       "rotation": 0.0} if a is not None else
                      {"anomalytype": "NORMALITY", "anomaly_bp_name": "---", "distance_to_waypoint": 0,
                       "rotation": 0})
    return {"anomaly_config": anomaly_config, "id": plan.scenario_id, "weather_preset": "CLEAR_NOON",
            "frame_ids": plan.frame_ids, "anomaly_first_unoccluded_frame": plan.frame_ids[plan.first_visible]
            if a is not None else None}


def _scenario_folders(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir() and p.name.startswith("Scenario_")
                  and p.name != CONFIG_FOLDER)


def _warn_foreign(out: Path, ours: set[str], before: set[str]) -> None:
    """Say what writing into a used folder did: the scenarios of this seed it replaced (their
    earlier frames are gone), and the other scenario folders, which readers will mix in."""
    mine = {f"Scenario_{sid}" for sid in ours}
    replaced = sorted(before & mine)
    foreign = [name for name in _scenario_folders(out) if name not in mine]
    if replaced:
        warnings.warn(f"{out}: replaced {len(replaced)} scenario folder(s) an earlier run had written "
                      f"(e.g. {replaced[0]}); write into an empty folder to keep both", stacklevel=3)
    if foreign:
        warnings.warn(f"{out}: also holds {len(foreign)} scenario folder(s) this run did not write "
                      f"(e.g. {foreign[0]}); readers will see them as part of the split", stacklevel=3)


def _check(scenarios, frames, seed, share, sensor_sets, points_per_sweep, braking_share=0.0) -> None:
    if not (isinstance(scenarios, int | np.integer) and scenarios >= 1):
        raise ConfigError(f"--scenarios must be a positive integer, got {scenarios!r}")
    if not (isinstance(frames, int | np.integer) and frames >= 1):
        raise ConfigError(f"--frames must be a positive integer, got {frames!r}")
    if not (isinstance(seed, int | np.integer) and seed >= 0):
        raise ConfigError(f"--seed must be a non-negative integer, got {seed!r}")
    if not (isinstance(share, float | int) and math.isfinite(share) and 0.0 <= share <= 1.0):
        raise ConfigError(f"--anomaly-share must be in [0, 1], got {share!r}")
    if not (isinstance(braking_share, float | int) and math.isfinite(braking_share) and 0.0 <= braking_share <= 1.0):
        raise ConfigError(f"--braking-share must be in [0, 1], got {braking_share!r}")
    if braking_share > 0 and frames < 2:
        raise ConfigError(f"--braking-share needs at least 2 frames per scenario (the lead vehicle brakes "
                          f"after the first), got --frames {frames}")
    if sensor_sets not in SENSOR_SETS:
        raise ConfigError(f"--sensor-sets must be one of {sorted(SENSOR_SETS)}, got {sensor_sets!r}")
    if points_per_sweep < MIN_POINTS_PER_SWEEP:
        raise ConfigError(f"--points must be at least {MIN_POINTS_PER_SWEEP} (10 per channel), "
                          f"got {points_per_sweep}")


def add_synth_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `sparse-ad synth` (the caller adds the OUT positional)."""
    parser.add_argument("--scenarios", type=int, default=8, help="number of scenarios")
    parser.add_argument("--frames", type=int, default=10, help="frames per scenario")
    parser.add_argument("--seed", type=int, default=0, help="seed; same seed → identical files")
    parser.add_argument("--anomaly-share", type=float, default=0.6, help="share of scenarios with an anomaly")
    parser.add_argument("--braking-share", type=float, default=0.0,
                        help="share of the anomaly scenarios that are a sudden braking of the lead vehicle "
                             "(AnoVox's temporal anomaly, tag 100) instead of a static object")
    parser.add_argument("--sensor-sets", choices=sorted(SENSOR_SETS), default="mono",
                        help="AnoVox sensor rig: mono (one set) or stereo (three sets)")
    parser.add_argument("--points", type=int, default=DEFAULT_POINTS_PER_SWEEP,
                        help="LiDAR shots per sweep (75-90 %% return)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_synth(args: argparse.Namespace) -> int:
    summary = write_split(args.out, scenarios=args.scenarios, frames=args.frames, seed=args.seed,
                          anomaly_share=args.anomaly_share, sensor_sets=args.sensor_sets,
                          progress=not getattr(args, "no_progress", False), points_per_sweep=args.points,
                          braking_share=args.braking_share)
    print(summary.describe())
    return 0
